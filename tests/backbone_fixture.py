"""A tiny random DINOv2 saved with `save_pretrained`, loaded by the code under test through the real
`from_pretrained` path (no pretrained weights can be downloaded here)."""
from __future__ import annotations

import pytest

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=28, patch_size=7)


def save_tiny_dinov2(path, **overrides) -> str:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**{**TINY, **overrides})).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    return save_tiny_dinov2(tmp_path_factory.mktemp("tiny-dinov2"))
