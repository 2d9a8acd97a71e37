"""Retention (PEFT's "forgetting"): how well the tuned backbone still does its pretraining task.

After tuning, the adapted backbone's features go through the head it was pretrained with (not the new
task head), on images of its pretraining task that no run tunes on. A method that leaves the backbone as
it was (a linear probe) keeps the pretrained accuracy; one that rewrites it (full fine-tuning) may lose it.
- Embedded backbone: the 400 held-out MNIST digits of ``bench.data.embedded.retention_digits``, with the
  committed pretraining head.
- A checkpoint: the head stored in it, on ``TrainConfig.retention_data`` (``RETENTION_LAYOUT``), if given.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torch.utils.data import Dataset

from bench.backbones import pretraining_head
from bench.data.embedded import retention_digits
from bench.data.folders import build_retention
from bench.run.config import TrainConfig
from bench.settings import EMBEDDED_BACKBONE


@dataclass
class RetentionTask:
    """Images of the pretraining task and the pretraining head that classifies the backbone's features."""

    data: Dataset
    head: nn.Module


def retention_task(cfg: TrainConfig) -> RetentionTask | None:
    """The run's retention task, or None where there is none (a checkpoint without ``retention_data``,
    random weights, a causal LM)."""
    if cfg.retention_data is not None:
        head = pretraining_head(cfg.backbone, cfg.checkpoint)
        return RetentionTask(build_retention(cfg.retention_data, head.out_features, cfg.img_size), head)
    if cfg.backbone == EMBEDDED_BACKBONE and cfg.checkpoint is None and cfg.pretrained:
        return RetentionTask(retention_digits(), pretraining_head(cfg.backbone))
    return None


def pretraining_logits(net: nn.Module, head: nn.Module, images: Tensor) -> Tensor:
    """The pretraining head applied to a timm model's pooled features (its own head skipped)."""
    return head(net.forward_head(net.forward_features(images), pre_logits=True))
