"""Benchmark tasks by name: embedded ones (real images from wheels) and folder ones (VTAB-1k, FGVC).

Names: "digits", "rotation", "texture" (see `bench.data.embedded`), "vtab/<task>" and
"fgvc/<dataset>" (see `bench.data.folders` for the expected folder layouts).
"""

from __future__ import annotations

from pathlib import Path

from bench.data.base import Task, TensorImageDataset
from bench.data.embedded import EMBEDDED_TASKS, IMG_SIZE, build_embedded, load_mnist_split
from bench.data.folders import FGVC_DATASETS, VTAB_NUM_CLASSES, build_fgvc, build_vtab

__all__ = ["Task", "TensorImageDataset", "build_task", "list_tasks", "load_mnist_split"]


def list_tasks() -> list[str]:
    """Names of the embedded tasks, which need no data on disk."""
    return list(EMBEDDED_TASKS)


def build_task(
    name: str, data_root: str | Path | None = None, img_size: int | None = None, *, protocol: str = "paper"
) -> Task:
    """Build task `name`; `data_root` and `img_size` (default 224) apply to folder tasks only.

    `protocol` picks the VTAB-1k training set: "paper" (train800val200, as reported in the papers)
    or "tune" (train800, with val200 held out); see `bench.data.folders.build_vtab`.
    """
    kind, _, sub = name.partition("/")
    if name in EMBEDDED_TASKS:
        if img_size not in (None, IMG_SIZE):
            raise ValueError(
                f"embedded task {name!r} has fixed {IMG_SIZE}x{IMG_SIZE} images, got img_size={img_size}"
            )
        return build_embedded(name)
    if kind == "vtab" and sub in VTAB_NUM_CLASSES:
        return build_vtab(sub, data_root, img_size, protocol=protocol)
    if kind == "fgvc" and sub in FGVC_DATASETS:
        return build_fgvc(sub, data_root, img_size)
    raise ValueError(
        f"unknown task {name!r}; expected one of {list_tasks()}, 'vtab/<task>' with <task> in "
        f"{sorted(VTAB_NUM_CLASSES)}, or 'fgvc/<dataset>' with <dataset> in {sorted(FGVC_DATASETS)}"
    )
