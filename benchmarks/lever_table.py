"""One Markdown row per pipeline workdir: the levers it was run with and what its samples scored.

  python benchmarks/lever_table.py workdirs/quickstart workdirs/q_top8 ...

Reads each workdir's report.json and the config.json of its stage-1 run and priors (what
`python -m vqjax.pipeline` writes), and prints the table of benchmarks/RESULTS.md's lever study:
code-map sizes and codebook, prior width / depth / steps / dropout, the sampling settings,
held-out bits per code beside the unigram baseline, and the unfiltered samples' Frechet distance
beside held-out real and blurred images of the same count (evaluation network features), the
FD ratio to the blurred images, the judge's class shares and the total time.
"""

import argparse
import json
import os
import sys

COLUMNS = (
  "run",
  "maps (top / bottom)",
  "K",
  "prior ch / blocks x res / steps / dropout (top; bottom)",
  "T / top-k / top-p",
  "bits per code top (unigram); bottom (unigram)",
  "FD samples / real / blurred",
  "FD / blurred",
  "class share min-max",
  "CAS",
  "minutes (this launch)",
)


def _read(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _prior(config: dict) -> str:
  m = config["model"]
  return (
    f"{m['channels']} / {m['num_blocks']}x{m['num_res_blocks']} / {config['train']['steps']} / "
    f"{m['dropout']:g}"
  )


def row(workdir: str) -> list[str]:
  """The table row of one pipeline workdir."""
  report = _read(os.path.join(workdir, "report.json"))
  stage1 = _read(os.path.join(workdir, "stage1", "config.json"))
  priors = [_read(os.path.join(workdir, p, "config.json")) for p in ("prior_top", "prior_bottom")]
  settings = _read(os.path.join(workdir, "samples_eval", "settings.json"))
  shapes = priors[0]["prior"]["code_shapes"]
  ev = report["evaluation"]["samples"]
  bits = "; ".join(
    f"{report[p]['eval/bits_per_code']:.2f} ({report[p]['unigram_bits_per_code']:.2f})"
    for p in ("prior_top", "prior_bottom")
  )
  return [
    os.path.basename(os.path.normpath(workdir)),
    " / ".join(f"{h}x{w}" for h, w in shapes),
    str(stage1["vq"]["num_codes"]),
    "; ".join(_prior(p) for p in priors),
    f"{settings['temperature']:g} / {settings['top_k']} / {settings['top_p']:g}",
    bits,
    f"{ev['frechet_distance']:.2f} / {ev['real_images/frechet_distance']:.2f} / "
    f"{ev['blurred_images/frechet_distance']:.2f}",
    f"{ev['fd_ratio_to_blurred']:.2f}",
    f"{ev['class_share_min']:.3f}-{ev['class_share_max']:.3f}",
    f"{ev.get('classification_accuracy_score', float('nan')):.3f}",
    f"{report['seconds'] / 60:.1f}",
  ]


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+", help="pipeline workdirs with a report.json")
  args = parser.parse_args(argv)
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
  for workdir in args.workdirs:
    try:
      lines.append("| " + " | ".join(row(workdir)) + " |")
    except (OSError, KeyError, ValueError) as e:
      print(f"lever_table.py: {workdir}: not a finished pipeline workdir ({e})", file=sys.stderr)
      return 1
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
