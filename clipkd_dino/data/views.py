"""Replayable augmentation views: view k of a sample is a pure function of (seed, sample key, k).

The labelling pass stores the teacher's embedding of views 0..K-1 of every sample; a training step that draws view k
of a sample replays exactly the same crop and flip, so a cached teacher and an online teacher see the same pixels.
The crop follows torchvision's RandomResizedCrop (10 tries of area in `scale` and log-uniform aspect ratio in
`ratio`, then the central crop of the clamped ratio), drawn from a generator seeded by a hash of (seed, key, k)
instead of torch's global one.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import asdict, dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF


@dataclass(frozen=True)
class CropBox:
    top: int
    left: int
    height: int
    width: int
    flip: bool


@dataclass(frozen=True)
class ViewSpec:
    """Everything a view depends on besides the sample: output size, crop ranges, flip probability, normalisation."""

    size: int
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.0
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    seed: int = 0

    def box(self, key: str, view: int, width: int, height: int) -> CropBox:
        """The crop and flip of view `view` of sample `key` on a `width` x `height` image."""
        rng = random.Random(int.from_bytes(hashlib.sha256(f"{self.seed}\0{key}\0{view}".encode()).digest()[:8]))
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        flip = rng.random() < self.hflip
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return CropBox(rng.randint(0, height - h), rng.randint(0, width - w), h, w, flip)
        aspect = width / height
        if aspect < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif aspect > max(self.ratio):
            w, h = round(height * max(self.ratio)), height
        else:
            w, h = width, height
        return CropBox((height - h) // 2, (width - w) // 2, h, w, flip)

    def pixels(self, image: Image.Image, key: str, view: int) -> torch.Tensor:
        """[3, size, size] uint8 RGB pixels of view `view` of `image` (the sample `key`)."""
        image = image.convert("RGB")
        box = self.box(key, view, *image.size)
        crop = TF.resized_crop(image, box.top, box.left, box.height, box.width, [self.size, self.size],
                               interpolation=InterpolationMode.BICUBIC)
        return TF.pil_to_tensor(TF.hflip(crop) if box.flip else crop)

    def __call__(self, image: Image.Image, key: str, view: int) -> torch.Tensor:
        """[3, size, size] float view, normalised with `mean` and `std` (what the teacher embeds)."""
        return TF.normalize(self.pixels(image, key, view).float() / 255, self.mean, self.std)

    def describe(self) -> dict:
        """JSON-ready: tuples as lists."""
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {"kind": "random_resized_crop", "interpolation": "bicubic", **fields}
