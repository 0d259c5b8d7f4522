#!/usr/bin/env bash
# The project's GPU checks in one run, on a machine with one CUDA GPU, in order of importance: xformers
# parity (the CUDA tests, benchmarks/attention.py), the decoding tables in bf16 with xformers on
# (benchmarks/decoding.py on the copy task at batch 8 and 1, benchmarks/decoding_sft.py on the recall
# split), bf16 training throughput (benchmarks/training_throughput.py) and the text task's table. Each part
# has its own time limit; one that fails does not stop the others. Results land in $OUT (default runs/gpu):
# a JSON per table and log.txt with every part's output.
#
# It needs the models the CPU tables used, at their usual paths (runs/bench_decoding/*, the recall-split SFT
# AR peer and data/english/sft_recall.jsonl, the text recipes' models and data/english/valid.jsonl;
# experiments/results/README.md has the commands that make them):
#
#     OUT=runs/gpu bash benchmarks/gpu_check.sh
#
# To run it on another machine, `bash benchmarks/gpu_check.sh stage DIR` first copies what it reads (the
# models' pipeline folders and the data files, about 40 MB) into DIR with the same relative paths; copy DIR's
# runs/ and data/ into the repository root there.
set -u
INPUTS="runs/bench_decoding/bidirectional/pipeline runs/bench_decoding/block_causal/pipeline
runs/bench_decoding/causal/pipeline runs/bench_decoding/causal_hf_llama runs/text_tiny_ar/pipeline
runs/text_tiny_sft_ar_recall/pipeline runs/text_tiny_adapt_bd3/pipeline runs/text_tiny_eval/pipeline
data/english/sft_recall.jsonl data/english/sft_valid.jsonl data/english/valid.jsonl"
if [ "${1:-}" = stage ]; then
  dir=${2:?usage: gpu_check.sh stage DIR}
  for path in $INPUTS; do
    [ -e "$path" ] || { echo "missing $path: make it first (experiments/results/README.md)"; exit 1; }
    mkdir -p "$dir/$(dirname "$path")" && cp -r "$path" "$dir/$(dirname "$path")/"
  done
  du -sh "$dir"
  exit 0
fi
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

$PY -m xformers.info >>"$LOG" 2>&1  # which of its kernels load here
part tests 60 $PY -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_backbone.py
part attention 45 $PY benchmarks/attention.py --device cuda --dtype bfloat16 --out "$OUT/attention-cuda.json"
for batch in 8 1; do
  part "copy_b$batch" 80 $PY benchmarks/decoding.py --device cuda --in-process --threads 4 --batch "$batch" --rounds 3 \
    --out "$OUT/decoding-copy-cuda-b$batch.json"
done
# the recall split's block diffusion model is trained here (bf16; about 50 minutes on one CPU core), from
# the AR peer that was SFT'd on the CPU (experiments/results/README.md, decoding-sft-recall2k-cpu.json)
if [ ! -f runs/text_tiny_sft_bd3_recall2k/pipeline/model/config.json ]; then
  part sft_train 150 $PY train.py configs/text_tiny_sft_bd3_from_ar.yaml run.name=text_tiny_sft_bd3_recall2k \
    model.init_from=runs/text_tiny_sft_ar_recall/pipeline 'data.train_files=[data/english/sft_recall.jsonl]' \
    'data.valid_files=[data/english/sft_valid.jsonl]' tokenizer.path=runs/text_tiny_ar/pipeline/tokenizer \
    trainer.max_steps=2000 trainer.threads=4 trainer.progress=false trainer.save_every=0
fi
part sft_recall 120 $PY benchmarks/decoding_sft.py --device cuda --in-process --threads 4 \
  --pairs data/english/sft_recall.jsonl --bd3 runs/text_tiny_sft_bd3_recall2k/pipeline \
  --ar runs/text_tiny_sft_ar_recall/pipeline --work runs/bench_decoding_sft_recall2k \
  --out "$OUT/decoding-sft-recall2k-cuda.json"
part training 120 $PY benchmarks/training_throughput.py --device cuda --out "$OUT/training-throughput-cuda.json"
part text 80 $PY benchmarks/decoding.py --task text --device cuda --in-process --threads 4 \
  --out "$OUT/decoding-text-cuda.json"
grep "^===" "$LOG"
