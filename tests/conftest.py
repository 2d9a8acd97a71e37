"""Shared fixtures: a tiny timm ViT that builds in milliseconds."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer


def make_tiny_vit(num_classes: int = 5, seed: int = 0) -> VisionTransformer:
    """A 2-block ViT on 16x16 single-channel images (dim 32): exercises every target kind."""
    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=num_classes
    )


@pytest.fixture
def tiny_vit() -> VisionTransformer:
    return make_tiny_vit()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
