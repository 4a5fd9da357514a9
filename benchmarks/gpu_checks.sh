#!/usr/bin/env bash
# The GPU checks of one device session, as one script (run from the repository root):
#   1. the CUDA tests (engine onloading vs the CPU run, GPTQ on CUDA vs CPU);
#   2. GPTQ of single layers on the GPU (benchmarks/bench_gptq_llmcompressor.py);
#   3. bench_device.py: the ~1.1B Llama-style model, K = 8 experts, GPTQ and E-PMQ.
# Each step has its own time limit and writes under $OUT (default /tmp/epmq-gpu), so a step
# that runs out of time keeps what it measured. Wheels in .whl/ (e.g. pydantic) are installed
# into /tmp/site first when the machine lacks them.
#   STEPS="tests layers device" TESTS_S=150 LAYERS_S=60 DEVICE_S=330 bash benchmarks/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-/tmp/epmq-gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
STEPS=${STEPS:-tests layers device}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"

if [[ $STEPS == *tests* ]]; then
  timeout "${TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider -x \
    tests/models/test_device.py tests/quant/test_gptq.py 2>&1 | tail -n 25 | tee "$OUT/tests.log"
fi
if [[ $STEPS == *layers* ]] && [ -f benchmarks/bench_gptq_llmcompressor.py ]; then
  timeout "${LAYERS_S:-90}" python3 benchmarks/bench_gptq_llmcompressor.py --device cuda \
    --sizes ${LAYER_SIZES:-4096x4096,11008x4096,2048x5632} --json "$OUT/layers.json" \
    2>&1 | tee "$OUT/layers.log"
fi
if [[ $STEPS == *device* ]]; then
  timeout "${DEVICE_S:-330}" python3 benchmarks/bench_device.py --preset gpu \
    --json "$OUT/bench_device.jsonl" ${DEVICE_ARGS:-} 2>&1 | tee "$OUT/bench_device.log"
fi
