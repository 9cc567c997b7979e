"""Independent check of `clipkd eval --karpathy`: Recall@K (any_caption protocol) with plain open_clip only.

Never imports clipkd_dino: it reads the Karpathy split file itself, encodes with open_clip's own model, tokenizer and
preprocessing, ranks every query against the full similarity matrix (fine up to COCO 5k x 25k) and prints the same
keys as `clipkd eval`. With --compare REPORT.json it exits 1 unless every value agrees within --tolerance points.
Ties (e.g. the same caption written for two images) are broken arbitrarily here but against the correct item by
clipkd, so real data may differ by a few hundredths of a point: use --tolerance 0.1 there.

    python benchmarks/check_karpathy.py dataset_coco.json --images COCO_ROOT --model local-dir:exported \
        --compare coco.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

KS = (1, 5, 10)


def karpathy_split(path: Path, root: Path, split: str) -> tuple[list[Path], list[str], list[int]]:
    images, captions, owner = [], [], []
    for record in json.loads(path.read_text())["images"]:
        if record["split"] == split:
            owner += [len(images)] * len(record["sentences"])
            captions += [sentence["raw"] for sentence in record["sentences"]]
            images.append(root / record.get("filepath", "") / record["filename"])
    return images, captions, owner


@torch.no_grad()
def recall(model_name: str, pretrained: str | None, images: list[Path], captions: list[str],
           owner: list[int]) -> dict[str, float]:
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    image_features = torch.cat([model.encode_image(torch.stack([preprocess(Image.open(p)) for p in images[i:i + 64]]))
                                for i in range(0, len(images), 64)])
    text_features = torch.cat([model.encode_text(tokenizer(captions[i:i + 256])) for i in range(0, len(captions), 256)])
    scores = F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    correct = torch.tensor(owner)[None, :] == torch.arange(len(images))[:, None]  # [images, captions]
    # rank of a query = position of its first correct item in the fully sorted score list
    i2t = correct.gather(1, scores.argsort(dim=1, descending=True)).float().argmax(dim=1)
    t2i = correct.T.gather(1, scores.T.argsort(dim=1, descending=True)).float().argmax(dim=1)
    metrics = {f"i2t_R@{k}": 100.0 * (i2t < k).float().mean().item() for k in KS}
    metrics.update({f"t2i_R@{k}": 100.0 * (t2i < k).float().mean().item() for k in KS})
    return metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("karpathy", type=Path)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--model", required=True, help="open_clip name or local-dir:DIR")
    parser.add_argument("--pretrained")
    parser.add_argument("--compare", type=Path, help="a clipkd eval report to check against")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="points of Recall@K (default: 1e-6)")
    args = parser.parse_args()
    images, captions, owner = karpathy_split(args.karpathy, args.images, args.split)
    metrics = recall(args.model, args.pretrained, images, captions, owner)
    print(json.dumps({"num_images": len(images), "num_captions": len(captions), "any_caption": metrics}, indent=2))
    if args.compare:
        theirs = json.loads(args.compare.read_text())["retrieval"]["any_caption"]
        bad = {k: (v, theirs.get(k)) for k, v in metrics.items()
               if not abs(v - theirs.get(k, float("nan"))) <= args.tolerance}
        print("agree" if not bad else f"DISAGREE (open_clip, clipkd): {bad}")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
