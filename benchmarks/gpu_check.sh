#!/usr/bin/env bash
# One short GPU check for a session that is lent a GPU machine: the CUDA tests, a 1-GPU torchrun smoke run (NCCL),
# a labelling pass and a cached distillation run on the GPU (the CUDA tests add KD++ classification and the
# chunked search), the step benchmarks on the GPU (a cached ViT-B-16 -> ViT-T-16 step at batch 128 with and without
# torch.compile) and the data pipeline at 8 loader workers. Prints everything; record the tables in
# docs/benchmarks.md with the card's name. Usage: bash benchmarks/gpu_check.sh   (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
.venv/bin/python -m pytest -q tests/test_cuda.py
tmp="$(mktemp -d)"
.venv/bin/clipkd toyworld --out "$tmp/tw" --train 2048 --val 256 --image-size 64 > /dev/null
.venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 1 -m clipkd_dino.cli train \
  configs/toy_student.yaml "data.train=$tmp/tw/train/shards" "data.val_retrieval=$tmp/tw/val/retrieval.jsonl" \
  "data.val_zeroshot=$tmp/tw/val/zeroshot" train.epochs=1 train.precision=bf16 "train.output_dir=$tmp/run" 2>&1 \
  | grep -v "batch/s" | tail -8
.venv/bin/clipkd label --teacher toy-teacher --teacher-pretrained assets/toy_teacher.pt \
  --concepts <(.venv/bin/python -c "import json; from clipkd_dino.toyworld.generate import KINDS; print(json.dumps({'format': 'clipkd-concept-pool', 'version': 1, 'concepts': [{'concept': k, 'count': 1} for k in KINDS]}))") \
  --data "$tmp/tw/train/shards" --templates "$tmp/tw/val/zeroshot/templates.json" --cache-views 2 \
  --crop-scale 0.8 1.0 --device cuda --precision bf16 --out "$tmp/labels" 2>&1 | tail -1
.venv/bin/clipkd train configs/toy_distill.yaml "data.train=$tmp/tw/train/shards" \
  "data.val_retrieval=$tmp/tw/val/retrieval.jsonl" "data.val_zeroshot=$tmp/tw/val/zeroshot" "distill.cache=$tmp/labels" \
  "distill.labels=$tmp/labels" train.epochs=1 train.precision=bf16 train.device=cuda "train.output_dir=$tmp/distill" \
  2>&1 | grep -v "batch/s" | tail -8
.venv/bin/python benchmarks/train_step.py --models toy-teacher ViT-T-16 --batch 128 --device cuda
.venv/bin/python benchmarks/distill_step.py --batch 128 --device cuda
.venv/bin/python benchmarks/distill_step.py --pairs ViT-B-16 --batch 128 --device cuda --compile
.venv/bin/python benchmarks/loader_speed.py --workers 8 --images 4000 2>&1 | grep -v "toyworld:"
