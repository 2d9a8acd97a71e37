"""Folder tasks, the paper's benchmarks: VTAB-1k (NOAH/SSF layout) and FGVC (VPT layout).

Preprocessing follows the loaders the SNELL/NOAH/VPT papers used, expressed with timm/torchvision:

- VTAB-1k: resize to img_size x img_size (bicubic, aspect ratio not kept), no augmentation.
- FGVC: train = resize shorter side to img_size/0.875, random crop, horizontal flip;
  val/test = resize shorter side to img_size/0.875, centre crop.

Both normalise with ImageNet mean/std (`FOLDER_MEAN`/`FOLDER_STD`) as those loaders do. Note that
timm's own config for the ImageNet-21k ViT-B/16 says mean = std = 0.5; pass `mean`/`std` to override.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets.folder import default_loader

from bench.data.base import Task

DEFAULT_IMG_SIZE = 224
FOLDER_MEAN, FOLDER_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
DEFAULT_VTAB_ROOT, DEFAULT_FGVC_ROOT = Path("data/vtab-1k"), Path("data/fgvc")

VTAB_NUM_CLASSES = {
    "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
    "svhn": 10, "sun397": 397,
    "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5,
    "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
    "smallnorb_azi": 18, "smallnorb_ele": 9,
}  # fmt: skip
# protocol -> (train list, val list); test is always test.txt.
VTAB_PROTOCOLS = {"paper": ("train800val200.txt", "val200.txt"), "tune": ("train800.txt", "val200.txt")}

VTAB_LAYOUT = """\
<data_root>/                  (default data/vtab-1k)
  <task>/                     e.g. cifar, dtd, smallnorb_ele
    images/...                the image files
    train800.txt              one sample per line: '<path relative to <task>/> <int label>'
    val200.txt
    train800val200.txt
    test.txt"""


@dataclass(frozen=True)
class FgvcSpec:
    """Where VPT keeps one FGVC dataset: its folder, the image folder inside it, its class count."""

    folder: str
    image_dir: str
    num_classes: int


FGVC_DATASETS = {
    "cub": FgvcSpec("CUB_200_2011", "images", 200),
    "nabirds": FgvcSpec("nabirds", "images", 555),
    "flowers": FgvcSpec("OxfordFlowers", "", 102),
    "dogs": FgvcSpec("StanfordDogs", "Images", 120),
    "cars": FgvcSpec("StanfordCars", "", 196),
}

FGVC_LAYOUT = """\
<data_root>/                  (default data/fgvc)
  <folder>/                   CUB_200_2011, nabirds, OxfordFlowers, StanfordDogs or StanfordCars
    train.json                {"<image path relative to the image folder>": <int label>, ...}
    val.json
    test.json
    <image folder>/...        images/ (CUB_200_2011, nabirds), Images/ (StanfordDogs),
                              the dataset folder itself (OxfordFlowers, StanfordCars)"""


class ImageListDataset(Dataset):
    """(image path, label) pairs loaded with PIL as RGB and transformed on access."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Callable[..., torch.Tensor]) -> None:
        self.samples = samples
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(default_loader(str(path))), label


def _require(path: Path, layout: str, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}\nExpected layout:\n{layout}")


def _check_samples(
    samples: list[tuple[Path, int]], source: Path, num_classes: int, layout: str, folder: Path
) -> None:
    """Fail before any training on an empty list, out-of-range labels, or any listed image that is
    missing, outside ``folder`` (``../``), not an image or truncated (``image_problem``); the error names
    how many and the first few."""
    if not samples:
        raise ValueError(f"{source} lists no images")
    bad = [label for _, label in samples if not 0 <= label < num_classes]
    if bad:
        raise ValueError(f"{source}: label {bad[0]} outside [0, {num_classes})")
    problems = [f"{path}: {problem}" for path, _ in samples if (problem := image_problem(path, folder))]
    if problems:
        shown = "\n  ".join(problems[:SHOWN_PROBLEMS])
        more = f"\n  ... and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        raise FileNotFoundError(
            f"{len(problems)} of the {len(samples)} images listed in {source} cannot be used:"
            f"\n  {shown}{more}\nExpected layout:\n{layout}"
        )


SHOWN_PROBLEMS = 5
IMAGE_ENDS = {"JPEG": (b"\xff\xd9",), "PNG": (b"IEND\xaeB`\x82",)}
"""The bytes a complete JPEG or PNG file ends with (JPEGs may carry a few padding bytes after them)."""


def image_problem(path: Path, folder: Path) -> str | None:
    """Why ``path`` cannot be a training image of ``folder``, or None: missing, outside the folder, not an
    image PIL can read, or (JPEG, PNG) cut short. Reads the header and the last bytes only."""
    if not path.resolve().is_relative_to(folder.resolve()):
        return f"outside {folder}"
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as image:
            kind = image.format
    except (OSError, SyntaxError) as err:  # PIL raises these for unreadable or non-image files
        return f"not an image ({err})"
    ends = IMAGE_ENDS.get(kind)
    if ends:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 32))
            tail = f.read()
        if not any(end in tail for end in ends):
            return f"truncated {kind} (no end marker)"
    return None


def _read_vtab_list(path: Path, task_dir: Path) -> list[tuple[Path, int]]:
    samples = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            relative, label = line.rsplit(maxsplit=1)
            samples.append((task_dir / relative, int(label)))
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: expected '<path> <int label>', got {line!r}") from e
    return samples


RETENTION_LAYOUT = """\
<retention_data>/
  retention.txt               one line per image: '<path relative to this folder> <class index>',
                              the index being a class of the backbone's pretraining head (e.g. one of
                              ImageNet-21k's 21843 for ViT-B_16.npz)
  <images ...>                any sub-folders; resized and normalised as VTAB-1k images"""


def build_retention(
    folder: str | Path,
    num_classes: int,
    img_size: int | None = None,
    *,
    mean: tuple[float, ...] = FOLDER_MEAN,
    std: tuple[float, ...] = FOLDER_STD,
) -> ImageListDataset:
    """Images of a backbone's pretraining task (see RETENTION_LAYOUT) to measure retention on, labelled
    with its pretraining head's classes (``num_classes`` of them)."""
    folder = Path(folder)
    list_path = folder / "retention.txt"
    _require(list_path, RETENTION_LAYOUT, "retention list")
    samples = _read_vtab_list(list_path, folder)
    _check_samples(samples, list_path, num_classes, RETENTION_LAYOUT, folder)
    return ImageListDataset(samples, _vtab_transform(img_size or DEFAULT_IMG_SIZE, mean, std))


def _vtab_transform(img_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
    """VTAB-1k's evaluation transform: resize to img_size x img_size (bicubic, squashed), normalise."""
    return create_transform(
        img_size, interpolation="bicubic", crop_pct=1.0, crop_mode="squash", mean=mean, std=std
    )


def build_vtab(
    task: str,
    data_root: str | Path | None = None,
    img_size: int | None = None,
    *,
    protocol: str = "paper",
    mean: tuple[float, ...] = FOLDER_MEAN,
    std: tuple[float, ...] = FOLDER_STD,
) -> Task:
    """VTAB-1k task `task` from `<data_root>/<task>/` (see VTAB_LAYOUT).

    protocol "paper" (what the papers report): train on train800val200, test on test; val is val200,
    a subset of train, so it monitors fitting only. protocol "tune": train on train800, val200 is
    genuinely held out (use it to pick hyperparameters); test is test.txt in both.
    """
    if protocol not in VTAB_PROTOCOLS:
        raise ValueError(f"unknown VTAB protocol {protocol!r}; expected one of {sorted(VTAB_PROTOCOLS)}")
    task_dir = Path(data_root or DEFAULT_VTAB_ROOT) / task
    _require(task_dir, VTAB_LAYOUT, f"VTAB-1k task folder for {task!r}")
    img_size = img_size or DEFAULT_IMG_SIZE
    num_classes = VTAB_NUM_CLASSES[task]
    transform = _vtab_transform(img_size, mean, std)
    splits = []
    for list_name in (*VTAB_PROTOCOLS[protocol], "test.txt"):
        list_path = task_dir / list_name
        _require(list_path, VTAB_LAYOUT, "VTAB-1k split list")
        samples = _read_vtab_list(list_path, task_dir)
        _check_samples(samples, list_path, num_classes, VTAB_LAYOUT, task_dir)
        splits.append(ImageListDataset(samples, transform))
    train, val, test = splits
    return Task(
        name=f"vtab/{task}",
        kind="vtab",
        train=train,
        val=val,
        test=test,
        num_classes=num_classes,
        in_chans=3,
        img_size=img_size,
        description=f"VTAB-1k {task} ({num_classes} classes), protocol {protocol!r}: train "
        f"{VTAB_PROTOCOLS[protocol][0]} ({len(train)}), val {VTAB_PROTOCOLS[protocol][1]} ({len(val)}), "
        f"test test.txt ({len(test)}).",
    )


def build_fgvc(
    dataset: str,
    data_root: str | Path | None = None,
    img_size: int | None = None,
    *,
    mean: tuple[float, ...] = FOLDER_MEAN,
    std: tuple[float, ...] = FOLDER_STD,
) -> Task:
    """FGVC dataset `dataset` (a key of FGVC_DATASETS) from VPT's train/val/test.json (see FGVC_LAYOUT).

    Labels are remapped to 0..K-1 by sorting the class ids found in the three json files, as VPT does.
    """
    spec = FGVC_DATASETS[dataset]
    data_dir = Path(data_root or DEFAULT_FGVC_ROOT) / spec.folder
    _require(data_dir, FGVC_LAYOUT, f"FGVC folder for {dataset!r}")
    image_dir = data_dir / spec.image_dir
    _require(image_dir, FGVC_LAYOUT, f"{dataset!r} image folder")
    annotations = {}
    for split in ("train", "val", "test"):
        json_path = data_dir / f"{split}.json"
        _require(json_path, FGVC_LAYOUT, "FGVC split file")
        annotations[split] = json_path, json.loads(json_path.read_text())
    class_ids = sorted({int(c) for _, anno in annotations.values() for c in anno.values()})
    if len(class_ids) > spec.num_classes:
        raise ValueError(
            f"{data_dir}: {len(class_ids)} classes in the json files, expected {spec.num_classes}"
        )
    contiguous = {class_id: i for i, class_id in enumerate(class_ids)}

    img_size = img_size or DEFAULT_IMG_SIZE
    crop_pct = 0.875  # resize shorter side to img_size / 0.875 (256 for 224), then crop
    train_transform = transforms.Compose(
        [
            transforms.Resize(int(img_size / crop_pct)),
            transforms.RandomCrop(img_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    eval_transform = create_transform(img_size, crop_pct=crop_pct, mean=mean, std=std)

    splits = {}
    for split, (json_path, anno) in annotations.items():
        samples = [(image_dir / path, contiguous[int(c)]) for path, c in anno.items()]
        _check_samples(samples, json_path, spec.num_classes, FGVC_LAYOUT, image_dir)
        splits[split] = ImageListDataset(samples, train_transform if split == "train" else eval_transform)
    return Task(
        name=f"fgvc/{dataset}",
        kind="fgvc",
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        num_classes=spec.num_classes,
        in_chans=3,
        img_size=img_size,
        description=f"FGVC {spec.folder} ({spec.num_classes} classes): train/val/test.json with "
        f"{len(splits['train'])}/{len(splits['val'])}/{len(splits['test'])} images (VPT splits).",
    )
