"""Command line converter: `python -m vqjax.convert rosinality-vqvae2 IN.pt OUT_DIR`
(and `rosinality-pixelsnail IN.pt OUT_DIR` for that repository's PixelSNAIL priors).

Writes OUT_DIR/config.json and OUT_DIR/variables (see `vqjax.convert`), which
`vqjax.convert.load_converted(OUT_DIR)` reads back. Errors are reported on one line.
"""

import argparse
import sys

from vqjax import _cli
from vqjax.convert import pixelsnail, rosinality, save_converted


def _rosinality_vqvae2(args: argparse.Namespace) -> str:
  config, _, variables = rosinality.convert_vqvae2(args.checkpoint)
  if args.image_size:
    config.data.image_size = args.image_size
  save_converted(args.out_dir, config, variables, force=args.force)
  m, vq = config.model, config.vq
  return (
    f"wrote {args.out_dir}: VQ-VAE-2 with {config.data.channels} image channels, "
    f"channels {m.channels}, {m.num_res_blocks} res blocks of {m.res_channels}, "
    f"{vq.num_codes} codes of dim {vq.code_dim}"
  )


def _rosinality_pixelsnail(args: argparse.Namespace) -> str:
  overrides = {"num_heads": args.num_heads} if args.num_heads else {}
  config, _, variables = pixelsnail.convert_pixelsnail(args.checkpoint, **overrides)
  # A prior has no quantizer state; the directory layout stays that of save_converted.
  save_converted(args.out_dir, config, {"params": variables["params"], "vq_state": {}}, args.force)
  m = config.model
  h, w = config.prior.code_shapes[config.prior.level]
  cond = f", conditioned ({m.num_cond_res_blocks} cond res blocks)" if m.cond_res_channels else ""
  return (
    f"wrote {args.out_dir}: PixelSNAIL on {h}x{w} maps of {config.vq.num_codes} codes, "
    f"channels {m.channels}, {m.num_blocks} blocks, attention {m.attention}{cond}"
  )


def main(argv: list[str] | None = None) -> int:
  """Runs the converter named on the command line; returns the exit status."""
  parser = argparse.ArgumentParser(
    prog="python -m vqjax.convert", description="Convert weights trained elsewhere to vqjax."
  )
  commands = parser.add_subparsers(dest="command", required=True)
  p = commands.add_parser(
    "rosinality-vqvae2",
    help="a VQVAE state_dict from rosinality/vq-vae-2-pytorch (torch.save file)",
  )
  p.add_argument("checkpoint", help="the .pt file written by torch.save(model.state_dict())")
  p.add_argument("out_dir", help="directory for config.json and variables/")
  p.add_argument(
    "--image-size",
    type=int,
    default=0,
    help="set data.image_size in config.json (the reference trains on 256)",
  )
  p.add_argument("--force", action="store_true", help="overwrite OUT_DIR/variables")
  p.set_defaults(run=_rosinality_vqvae2)
  p = commands.add_parser(
    "rosinality-pixelsnail",
    help="a PixelSNAIL prior from rosinality/vq-vae-2-pytorch's train_pixelsnail.py",
  )
  p.add_argument("checkpoint", help="the .pt file ({'model', 'args'} or a bare state_dict)")
  p.add_argument("out_dir", help="directory for config.json and variables/")
  p.add_argument(
    "--num-heads", type=int, default=0, help="attention heads (not stored; the reference uses 8)"
  )
  p.add_argument("--force", action="store_true", help="overwrite OUT_DIR/variables")
  p.set_defaults(run=_rosinality_pixelsnail)
  args = parser.parse_args(argv)
  try:
    print(args.run(args))
  except (ValueError, ImportError, OSError) as e:
    # One readable line rather than a traceback: these are the user's input's problems.
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  _cli.setup()  # before JAX creates its backends
  sys.exit(main())
