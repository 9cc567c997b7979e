"""clipkd-dino: distil CLIP models with CLIP-KD objectives and the KD++ direction/norm ("dino") loss."""

__version__ = "0.1.0"
