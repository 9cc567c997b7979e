"""Any CLIP model for evaluation, each with its own tokenizer and image preprocessing: `load_eval_model` is the one
loader, `clipkd_dino.models.load_clip` (see `clipkd_dino.models.loading` for the forms it accepts)."""

from clipkd_dino.models.loading import LoadedCLIP, load_clip

load_eval_model = load_clip

__all__ = ["LoadedCLIP", "load_eval_model"]
