#!/usr/bin/env bash
# The GPU checks of this repository in one short run, with every figure written to one folder.
#
#   bash benchmarks/gpu_check.sh wheels          # here (network to PyPI): the missing packages as wheels in .whl/
#   OUT=gpu-check bash benchmarks/gpu_check.sh   # on the GPU machine (no network): install .whl/, run the checks
#
# What runs on the GPU, in this order (about 6 minutes on one H200, most of it the first
# DeepSpeed fused_adam build):
#   1. nvidia-smi, the preflight's facts of the node, the versions of torch, transformers, DeepSpeed;
#   2. the GPU-marked tests: real NVML in @gpu_profile's sampler, precision on this GPU,
#      DeepSpeed ZeRO-2 on CUDA through the trainer CLI, packed vs padded loss on CUDA (sdpa,
#      and flash_attention_2 when flash-attn is installed);
#   3. benchmarks/gpu_profile_overhead.py on the GPU (the NVML sampling path);
#   4. benchmarks/gpu_mfu.py: tokens/s per GPU and MFU, SmolLM2-135M and a 1.1B Llama, ZeRO-2 bf16.
# Each part has its own time limit and its own log under $OUT; a failing part does not stop the
# others. $OUT/summary.txt lists each part's exit status and time. OVERHEAD_STEPS (default 400)
# sets the steps of part 3.
#
# "wheels" downloads what a GPU image that already has torch, accelerate, nvidia-ml-py,
# matplotlib, tensorboard, pandas, pyarrow and huggingface-hub lacks (DeepSpeed is built into a
# wheel here: PyPI has only its sdist), for PYVER (default 3.12), into .whl/; the check installs
# them from there (WHEELS= another folder) without network access.
set -u

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1

if [ "${1:-}" = "wheels" ]; then
    PYVER=${PYVER:-3.12}
    mkdir -p .whl
    set -e
    # Pure-Python wheels, any platform; versions as in environments/requirements-gpu.lock.
    pin() { grep -i "^$1==" environments/requirements-gpu.lock | head -1 | cut -d" " -f1; }
    # bitsandbytes (QLoRA) is a 43 MB wheel: BNB=1 adds it, for an image without it.
    for name in metaflow datasets transformers dill multiprocess hjson pydantic pydantic-core annotated-types \
            typing-inspection peft ${BNB:+bitsandbytes}; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
            --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 --platform any \
            -d .whl "$(pin "$name")"
    done
    # DeepSpeed: an sdist; its wheel is pure Python when no op is prebuilt (they JIT on the GPU).
    DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "$(pin deepspeed)"
    du -sh .whl
    ls .whl
    exit 0
fi

OUT=${OUT:-test-artifacts/gpu-check}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}

WHEELS=${WHEELS:-.whl}  # what "wheels" downloaded
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu-check-site "$WHEELS"/*.whl > "$OUT/install.txt" 2>&1 || { cat "$OUT/install.txt"; exit 1; }
    export PYTHONPATH="/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# The deepspeed launcher the tests start is looked up next to the interpreter; from --target
# installs it is not there, so put a shim on PATH.
mkdir -p /tmp/gpu-check-bin
printf '#!/bin/sh\nexec %s -m deepspeed.launcher.runner "$@"\n' "$(command -v "$PYTHON")" > /tmp/gpu-check-bin/deepspeed
chmod +x /tmp/gpu-check-bin/deepspeed
export PATH="/tmp/gpu-check-bin:$PATH"

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.txt, record status and time
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    printf '%-22s exit %3d  %4d s\n' "$name" "$rc" "$((SECONDS - started))" | tee -a "$SUMMARY"
}

# The node's facts as the train step's preflight reads them (GPUs, driver, CUDA, NCCL, flash-attn).
part versions 120 sh -c "nvidia-smi; $PYTHON -m training.node_facts --gpus 1 --output-dir /tmp; \
$PYTHON -m pip list 2>/dev/null | grep -iE '^(torch|transformers|deepspeed|accelerate|flash.attn) '"
part gpu-tests 300 "$PYTHON" -m pytest -q -ra -p no:cacheprovider -m gpu tests/gpu tests/unit/test_packing.py
# 300 s: the CPU test's 40 steps took 72 s on 2 loaded cores (the old 90 s was too tight); on
# a GPU the steps take milliseconds and start-up dominates. Room for a machine 3x slower.
part gpu-profile-overhead 300 "$PYTHON" benchmarks/gpu_profile_overhead.py --steps "${OVERHEAD_STEPS:-400}"
part gpu-mfu 300 "$PYTHON" benchmarks/gpu_mfu.py
# Full fine-tuning, LoRA and QLoRA side by side on the bundled model (QLoRA needs bitsandbytes).
part lora-vs-full 420 "$PYTHON" benchmarks/lora_vs_full.py --methods none lora qlora --lora_learning_rate 1e-3 \
    --require-gpu
cat "$SUMMARY"
