"""Where the teacher's embeddings come from: the frozen teacher online, or the labelling pass's cache.

Both return the teacher's unnormalised image and caption embeddings of a training batch, float32 on the batch's
device, without gradients. Neither is an `nn.Module`, so the teacher is never part of the objective: it is not
DDP-wrapped, not trained, not saved in checkpoints.
"""

from __future__ import annotations

import torch

from clipkd_dino.data.views import ViewSpec
from clipkd_dino.errors import ConfigError


class OnlineTeacher:
    """The frozen teacher in eval mode, optionally with bf16 weights; sees the student's pixels and tokens."""

    views: ViewSpec | None = None
    num_views = 0

    def __init__(self, name: str, pretrained: str | None, precision: str, device: torch.device) -> None:
        from clipkd_dino.models import create_model, model_config

        self.model = create_model(name, pretrained, device).eval()
        self.model.requires_grad_(False)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.model.to(self.dtype)
        self.dim = int(model_config(name)["embed_dim"])
        self.logit_scale = float(self.model.logit_scale.exp())

    @torch.no_grad()
    def features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.model.encode_image(batch["images"].to(self.dtype)).float()
        return image, self.model.encode_text(batch["texts"]).float()


class CachedTeacher:
    """Embeddings read from a teacher-embedding cache by (sample key, view drawn, caption drawn): no forward."""

    def __init__(self, directory: str) -> None:
        from clipkd_dino.teacher import TeacherCache

        self.cache = TeacherCache(directory)
        manifest = self.cache.manifest
        if not manifest.get("views"):
            raise ConfigError(f"config key 'distill.cache': {directory} holds no image views "
                              "(run `clipkd label --cache-views K` with K >= 1)")
        spec = {k: tuple(v) if isinstance(v, list) else v for k, v in manifest["view_spec"].items()
                if k not in ("kind", "interpolation")}
        self.views, self.num_views = ViewSpec(**spec), int(manifest["views"])
        self.dim = int(manifest["dim"])
        self.logit_scale = float(manifest["teacher_logit_scale"])

    def features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        device = batch["images"].device
        keys, views, captions = batch["keys"], batch["view"].tolist(), batch["caption_index"].tolist()
        image = torch.stack([self.cache.image(key, view) for key, view in zip(keys, views)])
        text = torch.stack([self.cache.texts(key)[index] for key, index in zip(keys, captions)])
        return image.to(device, non_blocking=True), text.to(device, non_blocking=True)
