#!/usr/bin/env bash
# The GPU checks of the Flower-free core on a CUDA machine that has torch, transformers
# and peft but no package index: the CUDA tests, then the cohort, naive-client and
# throughput benchmarks (ALL=1), each log in OUT. BUNDLE is what scripts/device_bundle.py wrote,
# with the missing wheels in BUNDLE/whl (benchmarks/RESULTS.md, "GPU").
#
#     benchmarks/gpu.sh BUNDLE OUT
set -u
bundle=${1:?bundle folder}
out=${2:?output folder}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  "$bundle"/whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export FEDALORA_TEST_MODEL="$bundle/minilm" FEDALORA_TEST_DATASET="$bundle/bbc-news.csv"
minilm="model='$bundle/minilm' dataset='$bundle/bbc-news.csv'"
smollm2="model='$bundle/smollm2' dataset='$bundle/instructions.jsonl' partitioning='iid'"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/machine.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/machine.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | grep -v -E "Casting to class labels|Loading weights|Map:|Generating" \
    | tee "$out/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]}"
}

step cohort-smollm2 200 python3 benchmarks/cohort.py speed --random-weights --bf16 --clients 128 \
  --alone-clients 16 --cohort-sizes 8,32,128 --run-config "$smollm2 local-steps=5"
step test-cuda 90 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
step cohort-minilm 80 python3 benchmarks/cohort.py speed --bf16 --clients 64 --alone-clients 16 \
  --cohort-sizes 8,32,64 --run-config "$minilm"
if [ "${ALL:-0}" = 1 ]; then
  step naive 70 python3 benchmarks/naive.py --rounds 3 --run-config "$minilm"
  step throughput 60 python3 benchmarks/throughput.py --steps 30 --repeats 2 --run-config "$minilm"
fi
