"""Where the teacher's embeddings and the pseudo-labels come from: the frozen teacher online, or the labelling pass's
cache, and its labels.

Both teachers return the teacher's unnormalised image and caption embeddings of a training batch, float32 on the
batch's device, without gradients. Neither is an `nn.Module`, so the teacher is never part of the objective: it is
not DDP-wrapped, not trained, not saved in checkpoints.

Cache rows and labels are looked up by sample identity in the DataLoader workers (`BatchTargets`), as whole-batch
numpy operations on memory maps: the training step receives them as tensors, with no per-sample Python.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from clipkd_dino.data.pairs import select_samples
from clipkd_dino.data.views import ViewSpec
from clipkd_dino.errors import ConfigError


class OnlineTeacher:
    """The frozen teacher in eval mode, optionally with bf16 weights; sees the student's uint8 pixels, normalised
    with its own mean and std, and the student's tokens (so it needs the student's image size and tokenizer)."""

    views: ViewSpec | None = None
    num_views = 0

    def __init__(self, name: str, pretrained: str | None, precision: str, device: torch.device,
                 student: torch.nn.Module) -> None:
        from clipkd_dino.models.factory import PixelNormaliser, image_size
        from clipkd_dino.models.loading import load_clip, weights_digest

        loaded = load_clip(name, pretrained, device)
        self.digest = weights_digest(loaded.model)  # before any cast: what the labelling pass records
        own_tokens = loaded.model.token_embedding.num_embeddings if hasattr(loaded.model, "token_embedding") else None
        for what, mine, theirs in (("image_size", loaded.image_size, image_size(student)),
                                   ("context_length", loaded.context_length, student.context_length),
                                   ("vocab_size", own_tokens, student.token_embedding.num_embeddings)):
            if mine != theirs:
                raise ConfigError(f"config key 'distill.teacher': the online teacher needs the student's {what} "
                                  f"({mine} != {theirs}); distil from a cache (`clipkd label --cache-views K`), "
                                  "whose views are made for the student's input")
        self.model = loaded.model.eval()
        self.model.requires_grad_(False)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.model.to(self.dtype)
        self.dim, self.logit_scale = loaded.embed_dim, loaded.logit_scale
        self.pixels = PixelNormaliser(self.model).to(device)

    @torch.no_grad()
    def features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if batch["images"].dtype != torch.uint8:
            raise TypeError("the online teacher takes uint8 pixels (the training transforms' output)")
        image = self.model.encode_image(self.pixels(batch["images"]).to(self.dtype)).float()
        return image, self.model.encode_text(batch["texts"]).float()


class CachedTeacher:
    """Embeddings of the view and caption drawn for each sample, read from a teacher-embedding cache in the loader
    workers (`BatchTargets`): no forward. `views` replays the cached crops at the student's input size and
    normalisation, so a teacher at another resolution works."""

    def __init__(self, directory: str, student: torch.nn.Module) -> None:
        from clipkd_dino.models.factory import image_normalisation, image_size
        from clipkd_dino.teacher import TeacherCache

        self.cache = TeacherCache(directory)
        manifest = self.cache.manifest
        if not manifest.get("views"):
            raise ConfigError(f"config key 'distill.cache': {directory} holds no image views "
                              "(run `clipkd label --cache-views K` with K >= 1)")
        spec = {k: tuple(v) if isinstance(v, list) else v for k, v in manifest["view_spec"].items()
                if k not in ("kind", "interpolation")}
        mean, std = image_normalisation(student)
        self.views = replace(ViewSpec(**spec), size=image_size(student), mean=mean, std=std)
        self.num_views = int(manifest["views"])
        self.dim = int(manifest["dim"])
        self.logit_scale = float(manifest["teacher_logit_scale"])

    def features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        device = batch["images"].device
        return (batch["teacher_image"].to(device, non_blocking=True),
                batch["teacher_text"].to(device, non_blocking=True))


class BatchTargets:
    """Completes a collated batch in the loader worker: `teacher_image`, `teacher_text` [B, D] from the cache (the
    view and caption drawn) and `labels` [B] from the pseudo-labels, by the samples' identity hashes. A sample the
    labels or the cache do not hold is dropped and counted as `not_labelled` / `not_in_cache`."""

    def __init__(self, cache=None, labels=None) -> None:
        self.cache, self.labels = cache, labels

    def __call__(self, batch: dict) -> dict:
        ids = batch["ids"].numpy()
        keep = np.ones(len(ids), dtype=bool)
        skipped = dict(batch["skipped"])
        labels = None
        if self.labels is not None:
            labels, found = self.labels.label_rows(ids)
            keep &= found
            _count(skipped, "not_labelled", int((~found).sum()))
        if self.cache is not None:
            found = self.cache.covered(ids, batch["caption_index"].numpy())
            _count(skipped, "not_in_cache", int((keep & ~found).sum()))
            keep &= found
        batch = select_samples(batch, keep) if not keep.all() else batch
        batch["skipped"] = skipped
        if labels is not None:
            batch["labels"] = torch.from_numpy(labels[keep])
        if self.cache is not None:
            batch["teacher_image"], batch["teacher_text"] = self.cache.lookup(
                batch["ids"].numpy(), batch["view"].numpy(), batch["caption_index"].numpy())
        return batch


def _count(skipped: dict, reason: str, count: int) -> None:
    if count:
        skipped[reason] = skipped.get(reason, 0) + count
