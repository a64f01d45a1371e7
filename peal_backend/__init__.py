"""peal-backend: an active-learning ML backend for Label Studio (DINOv2 + LoRA, PEAL / C-PEAL)."""

__version__ = "0.1.0"
