#!/usr/bin/env bash
# The project's GPU checks in one run, on a machine with one CUDA GPU: xformers parity (the CUDA tests and
# benchmarks/attention.py), bf16 training throughput (benchmarks/training_throughput.py) and the decoding
# tables in bf16 with xformers on (benchmarks/decoding.py on the copy task at batch 1 and 8, and
# benchmarks/decoding_sft.py on the recall split). Each part has its own time limit and log; one that fails
# does not stop the others. Results land in $OUT (default runs/gpu): a JSON per table and log.txt.
#
# It needs the models the CPU tables used, at their usual paths (runs/bench_decoding/*, the recall-split SFT
# models and data/english/sft_recall.jsonl; experiments/results/README.md has the commands that make them):
#
#     OUT=runs/gpu bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
LOG="$OUT/log.txt"

part() {  # part NAME SECONDS COMMAND...: run it under a time limit, its output appended to the log
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "=== $name: rc $rc after $(($(date +%s) - start))s" | tee -a "$LOG"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
$PY -c "import torch, xformers, diffusers, transformers; print('torch', torch.__version__, 'xformers', xformers.__version__,
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -n 1 | tee -a "$LOG"

part tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_backbone.py
part attention 90 $PY benchmarks/attention.py --device cuda --dtype bfloat16 --out "$OUT/attention-cuda.json"
part training 150 $PY benchmarks/training_throughput.py --device cuda --out "$OUT/training-throughput-cuda.json"
for batch in 1 8; do
  part "copy_b$batch" 120 $PY benchmarks/decoding.py --device cuda --in-process --threads 4 --batch "$batch" --rounds 3 \
    --out "$OUT/decoding-copy-cuda-b$batch.json"
done
part sft_recall 150 $PY benchmarks/decoding_sft.py --device cuda --in-process --threads 4 \
  --pairs data/english/sft_recall.jsonl --bd3 runs/text_tiny_sft_bd3_recall2k/pipeline \
  --ar runs/text_tiny_sft_ar_recall/pipeline --work runs/bench_decoding_sft_recall2k \
  --out "$OUT/decoding-sft-recall2k-cuda.json"
grep "^===" "$LOG"
