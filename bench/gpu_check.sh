#!/usr/bin/env bash
# One prepared script for a lent GPU machine (about 5 minutes on an H200; the bench saves its JSON after every
# case, so a run cut short still brings back what it measured):
#   1. bf16 (and fp32 greedy) parity of our model vs transformers on a tiny random checkpoint, on CUDA;
#   2. the GPU benchmark (bf16 inference, bf16-autocast and fp32 training, CUDA events, warm-up).
# `bash bench/gpu_check.sh release` runs instead the release-size comparison (bench/gpu_release.py: random 8.27 B
# weights made on the GPU; a QLoRA step on an nf4 base, first token at 30 s / 5 / 20 min, decode at batch 1 / 8 /
# 32, a LoRA step, each against the planner; ~9 min). The machine has no bitsandbytes: first, here,
# `bash bench/gpu_site.sh`, then run it with carry=["bench/gpu_site"], timeout_s=590
# and kind="nvidia-h200" (its 141 GB also run the full fine-tune step, which an H100 skips). Back here
# `python bench/gpu_release.py --render <gpu_release.json> --doc docs/performance.md` writes its table.
# Results land in $OUT (the device tool's return folder) or bench/gpu_out. Back here, update the docs with
#   python bench/run.py --render <results_cuda.json>
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/gpu_out}"
mkdir -p "$OUT"
PY="${PY:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d bench/gpu_site ]; then  # packages carried to a machine without them (bench/gpu_site.sh)
  export PYTHONPATH="$PWD/bench/gpu_site${PYTHONPATH:+:$PYTHONPATH}"
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
  "$PY" -c "import peft; print('peft', peft.__version__)" || true
  "$PY" -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" || true
} 2>&1 | tee "$OUT/env.txt"

status=0
if [ "${1:-}" = release ]; then
  echo "== release size (8.27 B, bf16, CUDA) =="
  timeout 570 "$PY" bench/gpu_release.py --device cuda --out "$OUT/gpu_release.json" \
    2>&1 | tee "$OUT/gpu_release.log" || status=1
  exit $status
fi
echo "== parity (tiny model, bf16 + fp32, CUDA) =="
timeout 120 "$PY" bench/run.py --device cuda --cases parity --no-doc --out "$OUT/parity_cuda.json" \
  2>&1 | tee "$OUT/parity.log" || status=1

echo "== benchmark (CUDA) =="
timeout 420 "$PY" bench/run.py --device cuda --cases hardware,train,decode,prefill,features,load,decode_compile,train_compile \
  --timeout 200 --no-doc --out "$OUT/results_cuda.json" 2>&1 | tee "$OUT/bench.log" || status=1
exit $status
