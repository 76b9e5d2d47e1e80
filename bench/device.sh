#!/usr/bin/env bash
# seal-jax's SEAL-workload benchmark in one command, for a machine with one accelerator (GPU or TPU).
#
#   bash bench/device.sh                          # Qwen3-8B with random bf16 weights: minutes on an H100 or H200
#   SEAL_BENCH_PRESET=tiny bash bench/device.sh   # the tiny preset, --quick shapes: about a minute on a CPU
#
# Each decode row and the training row are timed twice, the second time without XLA's split-K rewrite of
# the GPU matmuls (--split-k-ab: BENCHMARKS.md, twenty-second and twenty-sixth sessions;
# SEAL_BENCH_SPLIT_K_AB=0 leaves it out; a run again after a crash leaves it out too).
#
# It installs this checkout into the Python it is given (pip install --no-deps -e .: the machine's image
# brings jax, flax, optax, orbax, transformers, peft and torch, and there may be no network), prints the
# versions, runs `seal-jax bench --preset $SEAL_BENCH_PRESET --random-weights` (plus the PyTorch reference
# on a CUDA GPU when torch sees it), prints a table last and writes the JSON report and the log under $OUT
# (bench-$SEAL_BENCH_PRESET.json and .log; after a crash, bench-$SEAL_BENCH_PRESET-chunked.* as well).
#
# Environment: PYTHON (default python3), OUT (default bench-results/), SEAL_BENCH_PRESET (default qwen3-8b),
# SEAL_BENCH_ARGS (more `seal-jax bench` flags, e.g. "--candidates 8 --no-reference"), SEAL_BENCH_INSTALL=0
# (run from the source tree without installing), SEAL_BENCH_SPLIT_K_AB=0 (no second timing without split-K).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
OUT="${OUT:-$root/bench-results}"
PRESET="${SEAL_BENCH_PRESET:-qwen3-8b}"
ARGS="${SEAL_BENCH_ARGS:-}"
if [ "$PRESET" = tiny ]; then
  ARGS="--quick $ARGS"  # the tiny preset's context (512 tokens) is shorter than SEAL's default shapes
fi
AB=""
if [ "${SEAL_BENCH_SPLIT_K_AB:-1}" = 1 ]; then
  AB="--split-k-ab"
fi
mkdir -p "$OUT"

if [ "${SEAL_BENCH_INSTALL:-1}" = 1 ]; then
  # no build isolation first: it would fetch setuptools from the network
  if ! "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . \
     && ! "$PY" -m pip install --quiet --no-deps -e .; then
    echo "device.sh: pip could not install this checkout; running it from the source tree" >&2
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PY" - <<'PYEOF'
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "transformers", "peft", "torch"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except ImportError:
        print(f"{name} not installed")
import jax
try:  # the engine is Flax NNX; an image whose flax predates its jax fails here, in seconds, not in the suite
    from flax import nnx  # noqa: F401
except Exception as error:
    import sys
    version = getattr(sys.modules.get("flax"), "__version__", None)
    if version is None:
        raise SystemExit(f"device.sh: flax is not installed in {sys.executable} ({error}); the engine needs it")
    raise SystemExit(f"device.sh: flax {version} cannot load flax.nnx with jax {jax.__version__} "
                     f"({type(error).__name__}: {error}); install a flax release made for this jax "
                     "(flax 0.12.12 is made for jax 0.11.1 and later)")
print("devices:", ", ".join(f"{d.platform}:{d.device_kind}" for d in jax.devices()))
PYEOF

bench() {  # bench NAME [FLAGS...]: the suite, its report in $OUT/NAME.json and its log in $OUT/NAME.log
  local name="$1"; shift
  set +e  # the suite's exit status is read, not acted on by -e
  # shellcheck disable=SC2086  # ARGS is a list of flags
  "$PY" -m seal_jax.cli bench --preset "$PRESET" --random-weights --out "$OUT/$name.json" $ARGS "$@" 2>&1 \
    | tee "$OUT/$name.log"
  status=${PIPESTATUS[0]}
  set -e
  echo "device.sh: report in $OUT/$name.json, log in $OUT/$name.log (exit $status)"
}

bench "bench-$PRESET" $AB
# Killed by SIGILL, SIGABRT, SIGBUS, SIGFPE or SIGSEGV: a compiler or kernel crash, which the suite's own
# kernel check (a child process on a GPU) cannot catch where it happens at the model's shapes. Unless the
# attention was chosen, run the whole suite again on "chunked" attention and without the split-K timings
# (no fused kernel, no second compile of each program: the crash may have been elsewhere, and then this
# costs a second run's time), so the one run on a lent machine still measures everything; the first report
# keeps the rows it finished, the second run's exit status is the script's, and the first one's signal is
# on stderr.
case "$status" in
  132|134|135|136|139)
    if [[ " $ARGS " != *" --attention"* ]]; then
      echo "device.sh: the suite died of signal $((status - 128)); running it again with --attention chunked" >&2
      bench "bench-$PRESET-chunked" --attention chunked
    fi
    ;;
esac
exit "$status"
