#!/usr/bin/env bash
# Step 2 of configs/clip/vit_b16_to_vit_t16_cc3m.yaml: the frozen ViT-B/16 labels CC3M + CC12M with the concept
# pool's top 1000 concepts and caches its embeddings of 2 views per image (fp16) and of every caption.
# Each of the 8 ranks labels its share of the shards; a killed run resumes (finished shards are kept).
# Edit DATA, TEACHER and POOL (the first two must match the distillation config).
set -euo pipefail
DATA="${DATA:-/data/cc3m/train-{000000..000331}.tar::/data/cc12m/train-{000000..001242}.tar}"
TEACHER="${TEACHER:-/checkpoints/vit_b16_cc3m_cc12m.pt}"
POOL="${POOL:-runs/cc3m_pool.json}"
OUT="${OUT:-runs/cc3m_labels}"
NPROC="${NPROC:-8}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
exec .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m clipkd_dino.cli label \
  --teacher ViT-B-16 --teacher-pretrained "$TEACHER" --concepts "$POOL" --top-k 1000 --data "$DATA" --out "$OUT" \
  --cache-views 2 --crop-scale 0.9 1.0 --precision bf16 --batch-size 256 --workers 8 --device cuda
