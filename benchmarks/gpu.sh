#!/usr/bin/env bash
# GPU figures for BENCHMARKS.md and a GPU test subset, in one run of about 8 minutes.
#
#   bash benchmarks/gpu.sh                      # from the repository root, on the GPU machine
#   GPU_SH_DRY=1 bash benchmarks/gpu.sh         # print each step, its time limit and command; run nothing
#   GPU_SH_ONLY="suite_f32 pytest" bash benchmarks/gpu.sh   # rerun only the named steps
#
# Everything lands under $OUT (default ./gpu_out): summary.txt (versions, then one line per step with
# its status and elapsed seconds, followed by the tail of its output), <step>.out and <step>.err
# (full stdout and stderr), synthetic/ (the workdir of the short training run).
#
# On the lent device machine (one GPU, 16 cores, no network): give the device runner the command
# `bash benchmarks/gpu.sh` with a timeout of about 570 s, which leaves the rest of the device
# allowance for rerunning a failed step with GPU_SH_ONLY; copy summary.txt and the .out files into
# BENCHMARKS.md, then give the machine back. The machine's python3 has jax (CUDA), flax, optax,
# orbax, chex, torch and torchvision; anything else the project imports is installed from the
# git-ignored wheel folder .wheels/ (pass it along with the working tree), never from the network.
# Build that folder beforehand on a machine with network access:
#
#   pip download -d .wheels --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     grain ml-collections pycocotools tensorboardX tensorflow-datasets tqdm flatbuffers
#
# then delete from it the large wheels the machine already has (numpy, jax, protobuf, ...).
#
# Each step runs under `timeout`; a failed or timed-out step is recorded and the next one runs.
# GPU_SH_BUDGET (seconds, default 540) caps the whole run: a step gets at most what is left of it,
# and steps are ordered by importance (GPU benchmarks first, the CPU-only input pipeline last).
set -u

DRY=${GPU_SH_DRY:-0}
ONLY=${GPU_SH_ONLY:-}
BUDGET=${GPU_SH_BUDGET:-540}
PY=${PYTHON:-python3}
OUT=$(realpath -m "${OUT:-./gpu_out}")  # absolute before the cd below
SUMMARY="$OUT/summary.txt"
DRY_USED=0
cd "$(dirname "$0")/.." || exit 1
[[ "$DRY" == 1 ]] || mkdir -p "$OUT"

log() {  # a line to stdout and, in a real run, to summary.txt
  echo "$*"
  [[ "$DRY" == 1 ]] || echo "$*" >> "$SUMMARY"
}

step() {  # step NAME LIMIT_S CMD...: run CMD under timeout, record status and elapsed time
  local name=$1 limit=$2
  shift 2
  if [[ -n "$ONLY" && " $ONLY " != *" $name "* ]]; then
    return 0
  fi
  local left=$((BUDGET - SECONDS - DRY_USED))
  if ((left < 10)); then
    log "$(printf '%-20s skipped: %ds of the %ds budget left' "$name" "$left" "$BUDGET")"
    return 0
  fi
  ((limit > left)) && limit=$left
  if [[ "$DRY" == 1 ]]; then
    log "$(printf '%-20s limit %3ds: %s' "$name" "$limit" "$*")"
    DRY_USED=$((DRY_USED + limit))  # the worst case: every step runs to its limit
    return 0
  fi
  local t0=$SECONDS rc status
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=TIMEOUT ;;
    *) status=FAILED ;;
  esac
  log "$(printf '%-20s %-7s rc=%-3d %4ds (limit %ds): %s' "$name" "$status" "$rc" "$((SECONDS - t0))" \
    "$limit" "$*")"
  tail -n 25 "$OUT/$name.out" | sed 's/^/    /' >> "$SUMMARY"
  if ((rc != 0)); then
    tail -n 8 "$OUT/$name.err" | sed 's/^/    err: /' >> "$SUMMARY"
  fi
}

install_missing() {  # import name = pip name; installs only what is missing, from .wheels only
  local missing=() pair
  for pair in grain=grain ml_collections=ml-collections pycocotools=pycocotools \
    tensorboardX=tensorboardX tensorflow_datasets=tensorflow-datasets absl=absl-py PIL=pillow \
    tqdm=tqdm flatbuffers=flatbuffers scipy=scipy pytest=pytest; do
    "$PY" -c "import ${pair%%=*}" 2> /dev/null || missing+=("${pair#*=}")
  done
  echo "missing: ${missing[*]:-none}"
  ((${#missing[@]} == 0)) && return 0
  if [[ ! -d .wheels ]]; then
    echo "no .wheels/ folder: cannot install ${missing[*]}" >&2
    return 1
  fi
  local pkg rc=0
  for pkg in "${missing[@]}"; do  # one at a time: a wheel lacking from .wheels blocks only its package
    # The user site, then (an externally managed system Python) past the system-packages guard.
    "$PY" -m pip install --quiet --no-index --find-links .wheels "$pkg" ||
      "$PY" -m pip install --quiet --user --no-index --find-links .wheels "$pkg" ||
      "$PY" -m pip install --quiet --user --break-system-packages --no-index --find-links .wheels "$pkg" ||
      rc=1
  done
  return $rc
}

versions() {
  nproc
  free -g | head -n 2
  "$PY" -c 'import sys, jax, flax, optax, torch, torchvision
print("python", sys.version.split()[0], "| jax", jax.__version__, "| flax", flax.__version__,
      "| optax", optax.__version__, "| torch", torch.__version__, "| torchvision", torchvision.__version__)
print("jax devices:", jax.devices())
print("torch cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
}

# `timeout` runs programs, not shell functions: these two run in a child bash that inherits them.
export -f install_missing versions
export PY PYTHONUNBUFFERED=1  # a timed-out step keeps the output it printed

[[ "$DRY" == 1 ]] || : > "$SUMMARY"
log "gpu.sh $(date -u '+%Y-%m-%d %H:%M UTC'), budget ${BUDGET}s, OUT=$OUT${ONLY:+, only: $ONLY}"
step nvidia_smi 15 nvidia-smi
step install_missing 45 bash -c install_missing
step versions 30 bash -c versions
# The interleaved suite against torchvision (AMP for bfloat16), with MFU; tables land in $OUT.
step suite_bf16 150 "$PY" benchmarks/suite.py --device=cuda --dtype=bfloat16 --batch_size=128 \
  --large_batch=256 --pairs=5 --write="$OUT/suite.md"
step suite_f32 130 "$PY" benchmarks/suite.py --device=cuda --batch_size=64 --large_batch=256 \
  --pairs=5 --write="$OUT/suite.md"
# One minute of the default experiment; 8 input workers so that the 16 cores, not the default 2
# workers, feed the GPU. If it is cut off, the last metrics.jsonl lines show how far it got.
step synthetic 60 "$PY" -m ssdjax.main --config=configs/synthetic.py --workdir="$OUT/synthetic" \
  --config.train.num_steps=1000 --config.data.num_workers=8
if [[ "$DRY" != 1 && -f "$OUT/synthetic/metrics.jsonl" ]]; then
  tail -n 3 "$OUT/synthetic/metrics.jsonl" | sed 's/^/    metrics.jsonl: /' >> "$SUMMARY"
fi
step pytest 70 "$PY" -m pytest -q -x tests/test_train.py tests/test_postprocess.py tests/test_models.py \
  -p no:xdist
step input_pipeline 40 "$PY" benchmarks/input_pipeline.py --train --steps=5 --workers=0,8 --runs=3
log "total ${SECONDS}s$([[ "$DRY" == 1 ]] && echo ", at most $((DRY_USED + 10))s if every step ran to its limit")"
