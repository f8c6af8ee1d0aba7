#!/usr/bin/env bash
# The GPU measurements, each run side by side with its peer in one command (see ../shared/GPU.md).
# On the lent H100, from the repository root, with .gpu/ (and .gpu-unsloth/ for "final") carried along:
#   bash scripts/bench/gpu_bench.sh explore   # TRL packed peer + titlegen variants with a kernel profile + GPU tests
#   bash scripts/bench/gpu_bench.sh final     # TRL peers (packed, seed notebook) + Unsloth + titlegen, one table
#   bash scripts/bench/gpu_bench.sh fast      # TRL packed + Unsloth + titlegen's fast path (VARIANTS), one table
#   bash scripts/bench/gpu_bench.sh recipe    # TRL with the seed notebook's settings + titlegen with the same recipe
#   bash scripts/bench/gpu_bench.sh predict   # HF generate peer + titlegen predict (NF4 and merged)
#   bash scripts/bench/gpu_bench.sh memory    # peak memory at 2048/4096 tokens (Llama-3-8B, Mistral-7B), token budgets
#   bash scripts/bench/gpu_bench.sh oom       # a batch too big for the GPU: the one-line error, then --model.oom_backoff
set -uo pipefail
cd "$(dirname "$0")/../.."
source .gpu/setup.sh || exit 1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
B=.gpu/bench
VARIANTS=${VARIANTS:-fast-offload-compile,recipe}  # the README's fast path and configs/llama3-8b-qlora.yaml
python -c "import torch, inspect; from torch.nn.attention import varlen; print('torch', torch.__version__, \
torch.cuda.get_device_name(), 'varlen_attn', inspect.signature(varlen.varlen_attn))" 2>&1 | tail -1
peer() { python $B/peer_bench.py --lengths $B/lengths_chars.json --variants $B/peer_variants.json --only "$1" \
  --out "$OUT/peer.jsonl" 2>"$OUT/peer.err" | grep '^{'; }
ours() { python scripts/bench/benchmark.py --lengths $B/lengths_chars.json --variants "$1" --out "$OUT/ours.jsonl" \
  ${2:-} 2>"$OUT/ours.err" | tee -a "$OUT/ours.log" | grep -E '^\{|^ *(Name|aten|void|ampere|sm90|Memcpy|triton|kernel|cutlass|Self)' | head -45; }
case "${1:-explore}" in
  explore)
    peer trl-packed-bs8-llama3-8b
    ours "$VARIANTS" --profile
    python -m pytest -q -m gpu tests/gpu/test_gpu.py -s 2>&1 | tail -4 ;;
  final)
    peer trl-packed-bs8-llama3-8b,seed000-trl-llama3-8b
    (source .gpu/setup-unsloth.sh && python $B/unsloth_bench.py packed 8 2>"$OUT/unsloth.err" | grep '^{') \
      || echo '{"name": "unsloth", "error": "see unsloth.err"}'
    ours "$VARIANTS" "${OURS_ARGS:-}" ;;
  fast)
    peer trl-packed-bs8-llama3-8b
    (source .gpu/setup-unsloth.sh && python $B/unsloth_bench.py packed 8 2>"$OUT/unsloth.err" | grep '^{') \
      || echo '{"name": "unsloth", "error": "see unsloth.err"}'
    ours "${VARIANTS/,recipe/}" "${OURS_ARGS:---warmup 4 --steps 8}" ;;
  recipe)
    peer seed000-trl-llama3-8b
    ours "$VARIANTS" "${OURS_ARGS:-}" ;;
  memory)
    for shape in llama3-8b mistral-7b; do for len in 2048 4096; do
      ours memory "--shape $shape --fixed-length $len --warmup 1 --steps 2 -- --data.max_tokens $len --data.max_length $len --model.backbone.checkpoint_fraction 1.0"
    done; done
    for budget in ${BUDGETS:-16384 24576 32768}; do
      ours fast "--warmup 1 --steps 3 -- --data.max_tokens $budget --model.backbone.checkpoint_fraction 1.0"
    done ;;
  predict)
    python $B/peer_predict.py 2>"$OUT/peer_predict.err" | grep '^{'
    python scripts/bench/benchmark_predict.py --lengths $B/lengths_chars.json --titles 2000 --batch ${BATCH:-512} \
      --variants ${PVARIANTS:-nf4,merged} 2>"$OUT/predict.err" | grep '^{' ;;
  oom)  # 64 examples of 2,048 tokens per step without recomputation: far over the GPU's memory
    python -c "import sys; sys.path.insert(0, 'scripts/bench'); from benchmark import make_checkpoint, make_data; \
from pathlib import Path; make_checkpoint('llama3-8b', Path('/tmp/peer_ckpt/llama3-8b')); \
make_data([[32, 2015]], 128256, 256, Path('$OUT/long.jsonl'))" 2>&1 | grep -i error
    OOM_ARGS="--config configs/llama3-8b-qlora.yaml --model.backbone.name_or_path /tmp/peer_ckpt/llama3-8b-titlegen
      --data.path $OUT/long.jsonl --data.prompt.template {title} --data.val_fraction 0 --data.num_val_samples 0
      --data.cache_dir $OUT/cache --data.batch_size 64 --trainer.accumulate_grad_batches 1
      --model.backbone.gradient_checkpointing false --trainer.max_steps 2 --trainer.logger false
      --trainer.enable_checkpointing false --trainer.default_root_dir $OUT/oom --model.backbone.training_graphs false"
    /usr/bin/time -f "wall %e s" python -m titlegen fit $OOM_ARGS 2>&1 | grep -E "titlegen: error|wall"; echo "exit ${PIPESTATUS[0]}"
    /usr/bin/time -f "wall %e s" python -m titlegen fit $OOM_ARGS --model.oom_backoff true 2>&1 \
      | grep -E "out of GPU memory|titlegen: error|wall|Error"; echo "exit ${PIPESTATUS[0]}" ;;
  levers)  # titlegen alone: each variant's tokens/s and peak memory, profiles in $OUT/levers-*.log
    for set in "${FVARIANTS:-fast,fast-offload,fast-compile,fast-offload-compile}" \
               "${RVARIANTS:-recipe,recipe-compile,recipe-ck50-offload-compile}"; do
      python scripts/bench/benchmark.py --lengths $B/lengths_chars.json --variants "$set" --out "$OUT/ours.jsonl" \
        --profile ${OURS_ARGS:---warmup 4 --steps 8} > "$OUT/levers-${set%%,*}.log" 2>&1
      grep -E '^\{' "$OUT/levers-${set%%,*}.log"
    done ;;
  profile-predict)
    python scripts/bench/profile_predict.py --batch ${BATCH:-1024} ${PROFILE_ARGS:-} 2>"$OUT/profile.err" | grep -v Warning | tail -45 ;;
esac
tail -3 "$OUT"/*.err 2>/dev/null | grep -iE "error|Traceback" | head -5
