#!/usr/bin/env bash
# One GPU session in one go: the CUDA test tier, then the SFT / DPO / RM / generation benchmarks on the GPU.
#
#   HF_DIR=smollm2-hf ALIGNKIT_SHARED_DATA=data OUT=out bench/gpu_check.sh
#
# HF_DIR                 SmolLM2-135M HF directory (config.json + tokenizer files). Without model.safetensors it gets
#                        random weights first (bench/make_random_smollm2.py).
# ALIGNKIT_SHARED_DATA   folder with alpaca/alpaca_train_2k.json and hh-rlhf/helpful-base/test.jsonl.gz.
# OUT                    optional: everything printed is also written to $OUT/gpu_check.log.
# GPU_CHECK_BUDGET       seconds for the whole script (default 420); a section gets at most what is left.
# GPU_TESTS              pytest paths (default: the gpu tests; `tests` needs every test dependency, gguf included).
# PYTHON                 interpreter (default python3).
#
# Each section runs under `timeout`, so one hang does not eat the rest; a summary with every exit code ends the log,
# and the script exits 1 when any section failed or was skipped.
set -u
cd "$(dirname "$0")/.."

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee "$OUT/gpu_check.log") 2>&1
fi

PYTHON=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-420}
GPU_TESTS=${GPU_TESTS:-"tests/gpu tests/losses/test_logprobs.py"}
START=$SECONDS
SUMMARY=()
FAILED=0

section() {  # section NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    local t=$((limit < left ? limit : left))
    echo
    echo "=================================================================== $name"
    if [ "$t" -lt 20 ]; then
        echo "skipped: ${left}s of the ${BUDGET}s budget left"
        SUMMARY+=("$(printf '%-10s skipped (budget)' "$name")")
        FAILED=$((FAILED + 1))
        return
    fi
    echo "\$ $* (timeout ${t}s)"
    local begin=$SECONDS
    timeout --kill-after=15 "$t" "$@"
    local rc=$?
    local note=""
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note=" (timed out)"; fi
    if [ "$rc" -ne 0 ]; then FAILED=$((FAILED + 1)); fi
    echo "--- $name: exit $rc$note after $((SECONDS - begin))s"
    SUMMARY+=("$(printf '%-10s exit %3d%s  %4ds' "$name" "$rc" "$note" "$((SECONDS - begin))")")
}

echo "=================================================================== environment"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PYTHON - <<'EOF'
import importlib.metadata
import platform

import torch

print(f"python {platform.python_version()}, torch {torch.__version__}, cuda available {torch.cuda.is_available()}",
      f"({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "")
for name in ("transformers", "peft", "accelerate", "trl", "datasets", "dill", "multiprocess", "gguf", "pyarrow"):
    try:
        print(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        print(f"{name}: not installed")
EOF

SIDES=alignkit,trl
if ! $PYTHON -c "import trl, datasets" 2> /dev/null; then
    echo "trl / datasets do not import: the benchmarks run the alignkit side only"
    SIDES=alignkit
fi
DATA=${ALIGNKIT_SHARED_DATA:-../shared/data}
for f in alpaca/alpaca_train_2k.json hh-rlhf/helpful-base/test.jsonl.gz; do
    [ -f "$DATA/$f" ] || echo "warning: $DATA/$f is missing (set ALIGNKIT_SHARED_DATA); the benchmark that reads it will fail"
done

if [ -z "${HF_DIR:-}" ]; then
    echo "warning: HF_DIR is not set; the benchmarks need it"
elif [ ! -f "$HF_DIR/model.safetensors" ]; then
    section random-weights 120 $PYTHON bench/make_random_smollm2.py "$HF_DIR"
fi

# shellcheck disable=SC2086  # GPU_TESTS is a list of paths
section tests 180 $PYTHON -m pytest -m gpu -q -rfEsxP -p no:cacheprovider $GPU_TESTS
section sft 120 $PYTHON bench/sft.py --device cuda --hf-dir "${HF_DIR:-}" --sides "$SIDES" \
    --steps 30 --batch-size 16 --records 800 --checkpointing off
section dpo 120 $PYTHON bench/dpo.py --device cuda --hf-dir "${HF_DIR:-}" --sides "$SIDES" \
    --steps 30 --batch-size 8 --records 400 --checkpointing off
section rm 120 $PYTHON bench/rm.py --device cuda --hf-dir "${HF_DIR:-}" --sides "$SIDES" \
    --steps 30 --batch-size 8 --records 400 --checkpointing off
section generate 150 $PYTHON bench/generate.py --device cuda --hf-dir "${HF_DIR:-}"

echo
echo "=================================================================== summary ($((SECONDS - START))s)"
printf '%s\n' "${SUMMARY[@]}"
exit $((FAILED > 0))
