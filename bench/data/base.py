"""Shared types: the `Task` record every loader returns and an in-memory image dataset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.data import Dataset

TaskKind = Literal["embedded", "vtab", "fgvc"]


@dataclass(frozen=True)
class Task:
    """A classification task: three splits plus what a model needs to know about its inputs.

    Every split yields `(image, label)` with `image` a float tensor (in_chans, img_size, img_size),
    already normalised, and `label` an int in [0, num_classes).
    """

    name: str
    kind: TaskKind
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    description: str


class TensorImageDataset(Dataset):
    """Images held in one tensor (N, C, H, W), yielding `(image, int label)`.

    `origin` records where each sample came from (an int64 tensor with one row per sample, meaning
    documented by the task that builds it) so that split disjointness can be checked. `transform`,
    if given, is applied to each image on access (e.g. random shifts for pretraining).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        origin: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if not len(images) == len(labels) == len(origin):
            raise ValueError(
                f"length mismatch: {len(images)} images, {len(labels)} labels, {len(origin)} origins"
            )
        self.images = images
        self.labels = labels
        self.origin = origin
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
