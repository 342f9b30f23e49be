#!/usr/bin/env bash
# The GPU measurements still open in benchmarks/RESULTS.md ("Where the issue's targets stand"),
# as one run that fits a short lease of one H100 / H200: the candidate forms against the PyTorch
# reference timed in the same process, cached sampling, a trace of the bottom prior's step, and
# the cold compile with less autotuning.
#
#   benchmarks/gpu_candidates.sh /path/to/vq-vae-2-pytorch [OUT_DIR]
#
# Each section writes OUT_DIR/<name>.txt and has a time limit; BUDGET (seconds, default 545)
# bounds the whole run, and a section that would get under 30 s is skipped. Wheels found in
# ./.whl (e.g. ml_collections on a machine without an index) are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
REF=${1:?usage: benchmarks/gpu_candidates.sh REFERENCE_CLONE [OUT_DIR]}
OUT=${2:-${OUT:-gpu_candidates_out}}
mkdir -p "$OUT"
START=$(date +%s)
END=$((START + ${BUDGET:-545}))
LOG=$OUT/run.log
export PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}

section() {  # section NAME MAX_SECONDS COMMAND...
  local name=$1 max=$2 left limit began rc
  shift 2
  left=$((END - $(date +%s)))
  limit=$((left < max ? left : max))
  if [ "$limit" -lt 30 ]; then
    echo "== $name: skipped, ${left} s left" | tee -a "$LOG"
    return
  fi
  began=$(date +%s)
  echo "== $name (limit ${limit} s) at +$((began - START)) s" | tee -a "$LOG"
  timeout -k 5 "$limit" "$@" >"$OUT/$name.txt" 2>&1
  rc=$?
  # The table rows and the lines that explain a failure or a compile.
  grep -E '^\{|^\| |Error|error:|GiB|compil|cached' "$OUT/$name.txt" \
    | grep -v '^| impl\|^| ---' | cut -c1-300 | tail -n 14
  echo "== $name rc=$rc in $(($(date +%s) - began)) s" | tee -a "$LOG"
}

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 || echo "wheel install failed" | tee -a "$LOG"
fi
command -v nvidia-smi >/dev/null \
  && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee -a "$LOG"
$PY -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__,
  'torch', torch.__version__, jax.devices())" 2>&1 | tail -n 1 | tee -a "$LOG"
git log -1 --format=%h 2>/dev/null | tee -a "$LOG"
CODES=(--set data.name=synthetic_codes --set "data.synthetic_shapes=[[32,32],[64,64]]"
  --set data.synthetic_num_codes=512)

# 1. Stage 1 (target 4x; 3.82x on run 6's H200): the platform's forms ("auto": adjoint
#    stride-2 convolutions, channels padded to 8) against the forms XLA differentiates itself.
section s1 150 $PY benchmarks/variants.py --config vqvae2_imagenet --dtype bfloat16 \
  --baseline-dir "$REF" --variant "" \
  --variant "model.upconv_impl=subpixel model.downconv_impl=lax model.channel_multiple=0"
# 2. The bottom prior (target 3x; 2.92x), with and without RngBitGenerator dropout bits.
section bottom 170 $PY benchmarks/variants.py --config pixelsnail_bottom_imagenet \
  --dtype bfloat16 --baseline-dir "$REF" "${CODES[@]}" --rounds 3 \
  --variant "" --variant "train.rng_impl=rbg"
# 3. Cached sampling of 64 images' codes (stretch target <= 3 s; 5.73 s on run 4), then with the
#    sampling loop captured in a CUDA graph (no host round trip per position).
SAMPLING=(benchmarks/sampling.py --prior pixelsnail --sampler cached --batch 64 --dtype bfloat16)
section sampling 90 $PY "${SAMPLING[@]}"
section sampling_cmdbuf 90 env XLA_FLAGS=--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL \
  $PY "${SAMPLING[@]}"
# 4. Where the bottom prior's step goes.
section bottom_profile 100 $PY benchmarks/profile_step.py --config pixelsnail_bottom_imagenet \
  --dtype bfloat16 "${CODES[@]}" --steps 3 --top 25 --out "$OUT/prof_bottom"
# 5. The cold compile (target <= 30 s; 29.9-30.3 s) with less autotuning, and the step's speed.
section s1_autotune2 70 env XLA_FLAGS=--xla_gpu_autotune_level=2 $PY benchmarks/variants.py \
  --config vqvae2_imagenet --dtype bfloat16 --baseline-dir "$REF" --variant ""
echo "== done at +$(($(date +%s) - START)) s" | tee -a "$LOG"
