#!/usr/bin/env bash
# One command for a GPU machine: run from the repository root on a fresh machine whose only network
# is the package registries, in under 8 minutes (GPU_CHECK_BUDGET_S, default 460 s of wall time):
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh            # OUT defaults to ./gpu-check
#   bash benchmarks/gpu_check.sh --dry-run                # no installs, no GPU steps (CI runs this)
#
# Steps, each under `timeout` with its own slice of the budget (never more than what is left), a
# failure recorded and the run going on:
#   env        a virtual environment .venv-gpu: with the machine's own CUDA torch when its system
#              python has one (--system-site-packages: no multi-GB download), else torch==2.13.0
#              from PyPI (the CUDA 13 build, which pins triton 3.7.1); then `.[gpu,test]`: the triton
#              that torch pins comes with it (torch 2.11's 3.6.0 is below the `triton` extra's floor).
#              GPU_CHECK_TORCH=2.13.0 forces the fresh torch.
#   versions   python, torch (+ CUDA, cuDNN), triton, numpy, onnxruntime and its providers, git commit;
#   nvidia-smi the driver's view of the device;
#   tests      the compiled correctness tests (no interpreter): the Triton kernels against the fp64
#              reference at the real channel counts, the CUDA front end and dispatch;
#   bench-*    the GPU benchmarks with a reduced budget (RTSED_BENCH_BUDGET_SCALE=0.05), one file at a
#              time so that a slow one cannot starve the others; pytest is stopped with SIGINT at its
#              limit, so that pytest-benchmark still writes the cases it finished.
#
# $OUT receives at most 8 files: steps.tsv (step, exit status, seconds, limit, note: 124 is a
# timeout), log.txt (every step's output), versions.txt, nvidia-smi.txt, tests.xml (JUnit),
# bench.json (pytest-benchmark's JSON per benchmark file, under its name), bench.md (the session
# summaries) and summary.txt. The exit status is 0 when every step passed, else 1.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (use --dry-run or nothing)" >&2; exit 2 ;;
    esac
done

OUT=${OUT:-$PWD/gpu-check}
mkdir -p "$OUT" || { echo "gpu_check.sh: cannot create OUT=$OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
BUDGET_S=${GPU_CHECK_BUDGET_S:-460}
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
START_S=$(date +%s)
FAILED=0
LOG="$OUT/log.txt"
: > "$LOG"
printf 'step\texit\tseconds\tlimit_s\tnote\n' > "$OUT/steps.tsv"

remaining() { echo $(( BUDGET_S - ($(date +%s) - START_S) )); }

# step NAME LIMIT_S NOTE CMD...: run CMD under timeout (SIGINT first, SIGKILL 15 s later), its
# output appended to log.txt, one line in steps.tsv.
step() {
    local name=$1 limit=$2 note=$3
    shift 3
    local left
    left=$(remaining)
    (( limit > left - 5 )) && limit=$(( left - 5 ))
    if (( limit < 5 )); then
        printf '%s\tbudget\t0\t0\tnot run: the %s s budget is spent\n' "$name" "$BUDGET_S" >> "$OUT/steps.tsv"
        FAILED=1
        return
    fi
    local t0 rc
    t0=$(date +%s)
    printf '\n===== %s (limit %s s): %s\n' "$name" "$limit" "$*" >> "$LOG"
    timeout -s INT -k 15 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    (( rc != 0 )) && FAILED=1
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" "$note" >> "$OUT/steps.tsv"
}

skip() {  # skip NAME WHY
    printf '%s\t-\t0\t0\tskipped: %s\n' "$1" "$2" >> "$OUT/steps.tsv"
}

# ------------------------------------------------------------------------------------------- env
PY=${GPU_CHECK_PYTHON:-python3}
make_env() {
    if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
            && [ -z "${GPU_CHECK_TORCH:-}" ]; then
        echo "using the system python's CUDA torch (venv with --system-site-packages)"
        "$PY" -m venv --system-site-packages .venv-gpu || return 1
    else
        "$PY" -m venv .venv-gpu || return 1
        .venv-gpu/bin/pip install -q "torch==${GPU_CHECK_TORCH:-2.13.0}" || return 1
    fi
    .venv-gpu/bin/pip install -q -e '.[gpu,test]'
}
export -f make_env
export PY OUT

if (( DRY )); then
    skip env "dry run: no installs, $PY as it is"
    VPY=$PY
else
    step env 240 "create .venv-gpu and install" bash -c make_env
    VPY=$PWD/.venv-gpu/bin/python
    [ -x "$VPY" ] || VPY=$PY
fi

# -------------------------------------------------------------------------------------- versions
versions() {
    "$VPY" - <<'EOF'
import importlib, platform, subprocess, sys
print("python", sys.version.split()[0], platform.platform())
for name in ("torch", "triton", "numpy", "onnxruntime", "onnx"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as e:  # a missing or broken package is a fact to record, not a reason to stop
        print(name, "unavailable:", type(e).__name__, e)
try:
    import torch
    print("torch.version.cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
          "cuda available", torch.cuda.is_available())
    if torch.cuda.is_available():
        print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
except Exception as e:
    print("torch cuda query failed:", e)
try:
    import onnxruntime as ort
    print("onnxruntime providers", ort.get_available_providers())
except Exception as e:
    print("onnxruntime providers unavailable:", e)
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
print("git", commit or "unknown")
EOF
}
export -f versions
export VPY
step versions 40 "versions.txt" bash -c 'versions > "$OUT/versions.txt"'

# ------------------------------------------------------------------------------------ nvidia-smi
step nvidia-smi 20 "nvidia-smi.txt" bash -c 'nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 &&
    nvidia-smi -q -d CLOCK,POWER,MEMORY,PERFORMANCE >> "$OUT/nvidia-smi.txt" 2>&1'

# ----------------------------------------------------------------------------- compiled tests
TESTS=(tests/test_kernel_dws.py tests/test_kernel_dilated.py tests/test_kernel_step_logits.py tests/test_frontend.py
       tests/test_ops.py)
if (( DRY )); then
    # Collect only: the selection must exist and import, or the GPU run would find out too late.
    step tests 120 "collect only (dry run)" "$VPY" -m pytest -q -p no:cacheprovider --collect-only \
        -k "compiled or cuda or gpu" --junitxml="$OUT/tests.xml" "${TESTS[@]}"
else
    step tests 150 "compiled kernels vs fp64 reference" env -u TRITON_INTERPRET "$VPY" -m pytest -q \
        -p no:cacheprovider -rs -k "compiled or cuda or gpu" --junitxml="$OUT/tests.xml" "${TESTS[@]}"
fi

# ---------------------------------------------------------------------------------- benchmarks
: > "$OUT/bench.md"
for bench in test_kernels_dilated test_kernels_dws test_gpu_models; do
    if (( DRY )); then
        skip "bench-$bench" "dry run: needs a CUDA GPU"
        continue
    fi
    case $bench in test_gpu_models) limit=110 ;; *) limit=70 ;; esac
    step "bench-$bench" $limit "RTSED_BENCH_BUDGET_SCALE=0.05" env -u TRITON_INTERPRET RTSED_BENCH_BUDGET_SCALE=0.05 \
        "$VPY" -m pytest -q -p no:cacheprovider -rs "benchmarks/$bench.py" --benchmark-only \
        --benchmark-json="$SCRATCH/$bench.json"
    if [ -f benchmarks/latest.md ]; then
        { echo "# $bench"; cat benchmarks/latest.md; echo; } >> "$OUT/bench.md"
        rm -f benchmarks/latest.md
    fi
done

# One bench.json: {"<benchmark file>": pytest-benchmark's JSON, or null where the run wrote none}.
"$VPY" - "$SCRATCH" "$OUT/bench.json" <<'EOF' || "$PY" -c 'import sys; open(sys.argv[1], "w").write("{}\n")' "$OUT/bench.json"
import json, pathlib, sys
scratch, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
runs = {}
for name in ("test_kernels_dilated", "test_kernels_dws", "test_gpu_models"):
    path = scratch / f"{name}.json"
    try:
        runs[name] = json.loads(path.read_text()) if path.exists() else None
    except ValueError as e:
        runs[name] = {"unreadable": str(e)}
out.write_text(json.dumps(runs, indent=1) + "\n")
EOF

# ------------------------------------------------------------------------------------- summary
{
    echo "gpu_check: $( ((DRY)) && echo 'dry run' || echo 'GPU run'), $(( $(date +%s) - START_S )) s of $BUDGET_S s"
    echo "failed steps: $(awk -F'\t' 'NR > 1 && $2 != "0" && $2 != "-" {printf "%s(%s) ", $1, $2}' "$OUT/steps.tsv")"
    grep -m1 -o 'tests="[0-9]*"\|errors="[0-9]*"\|failures="[0-9]*"\|skipped="[0-9]*"' "$OUT/tests.xml" 2>/dev/null | tr '\n' ' '
    echo
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"
exit $FAILED
