"""Tasks: embedded sizes, disjoint splits and determinism; VTAB/FGVC loaders on generated folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from bench.data import Task, build_task, embedded, list_tasks, load_mnist_split
from bench.data.embedded import MNIST_MEAN, MNIST_STD, build_embedded
from bench.data.folders import image_problem
from tests.harness import write_image, write_vtab_task

EMBEDDED_SIZES = {  # name: (train, val, test, num_classes)
    "digits": (800, 200, 797, 10),
    "rotation": (600, 8 * 150, 8 * 250, 8),
    "texture": (960, 320, 800, 16),
}


def _splits(task: Task) -> dict[str, torch.utils.data.Dataset]:
    return {"train": task.train, "val": task.val, "test": task.test}


def test_list_tasks() -> None:
    assert list_tasks() == list(EMBEDDED_SIZES)


@pytest.mark.parametrize("name", list(EMBEDDED_SIZES))
def test_embedded_sizes_shapes_labels(name: str) -> None:
    task = build_task(name)
    *sizes, num_classes = EMBEDDED_SIZES[name]
    assert (task.name, task.kind, task.in_chans, task.img_size) == (name, "embedded", 1, 28)
    assert task.num_classes == num_classes
    assert [len(s) for s in _splits(task).values()] == sizes
    for split in _splits(task).values():
        image, label = split[len(split) - 1]
        assert image.shape == (1, 28, 28) and image.dtype == torch.float32
        assert isinstance(label, int)
        assert sorted(split.labels.unique().tolist()) == list(range(num_classes))  # every class, nothing else


@pytest.mark.parametrize("name", list(EMBEDDED_SIZES))
def test_embedded_deterministic_and_cached(name: str) -> None:
    assert build_task(name) is build_task(name)
    fresh = build_embedded.__wrapped__(name)  # rebuild, bypassing the cache
    for split, again in zip(_splits(build_task(name)).values(), _splits(fresh).values(), strict=True):
        assert torch.equal(split.images, again.images)
        assert torch.equal(split.labels, again.labels)


def test_mnist_split_stratified_disjoint_normalised() -> None:
    mnist = load_mnist_split()
    pretrain, heldout = mnist.pretrain.origin.numpy(), mnist.heldout.origin.numpy()
    assert (len(pretrain), len(heldout)) == (4000, 1000)
    assert set(pretrain).isdisjoint(heldout) and len(set(pretrain) | set(heldout)) == 5000
    assert torch.bincount(mnist.heldout.labels).tolist() == [100] * 10
    # normalised with MNIST statistics: back in [0, 1] with the known mean
    raw = mnist.pretrain.images * MNIST_STD + MNIST_MEAN
    assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6
    assert abs(raw.mean().item() - MNIST_MEAN) < 0.01


def test_digits_disjoint_and_labelled_by_source() -> None:
    task = build_task("digits")
    origins = [set(s.origin.tolist()) for s in _splits(task).values()]
    assert sum(map(len, origins)) == len(set.union(*origins)) == 1797
    target = torch.from_numpy(load_digits().target)
    for split in _splits(task).values():
        assert torch.equal(split.labels, target[split.origin])


def test_rotation_uses_only_heldout_digits_disjointly() -> None:
    task = build_task("rotation")
    pretrain, heldout = (set(i.tolist()) for i in embedded.mnist_split_indices())
    origins = {k: set(s.origin.tolist()) for k, s in _splits(task).items()}
    assert [len(o) for o in origins.values()] == [600, 150, 250]
    assert set.union(*origins.values()) <= heldout and heldout.isdisjoint(pretrain)
    assert origins["train"].isdisjoint(origins["val"] | origins["test"])
    assert origins["val"].isdisjoint(origins["test"])
    # val/test show each digit at all 8 angles
    assert torch.equal(task.test.labels.reshape(-1, 8), torch.arange(8).expand(250, 8))
    assert (task.test.origin.reshape(-1, 8) == task.test.origin[::8, None]).all()


def test_rotation_labels_match_rotations() -> None:
    val = build_task("rotation").val
    digits = val.images[::8]  # angle 0
    original = load_mnist_split().heldout
    position = {int(o): i for i, o in enumerate(original.origin)}
    rows = [position[int(o)] for o in val.origin[::8]]
    assert torch.allclose(digits, original.images[rows], atol=1e-5)
    for k, turns in ((2, 1), (4, 2), (6, 3)):  # 90, 180, 270 degrees counter-clockwise: exact
        rotated = torch.rot90(digits, turns, dims=(-2, -1))
        assert torch.allclose(val.images[k::8], rotated, atol=1e-4)


def test_texture_crops_come_from_pixel_disjoint_cells() -> None:
    task = build_task("texture")
    photos = embedded._grey_photos()
    covered = {}
    for split_name, split in _splits(task).items():
        masks = [np.zeros(p.shape, dtype=bool) for p in photos]
        for (photo, top, left), image in zip(split.origin.tolist(), split.images, strict=True):
            masks[photo][top : top + 28, left : left + 28] = True
            expected = torch.from_numpy(photos[photo][top : top + 28, left : left + 28])
            assert torch.allclose(image[0] * MNIST_STD + MNIST_MEAN, expected, atol=1e-5)
        covered[split_name] = masks
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        for mask_a, mask_b in zip(covered[a], covered[b], strict=True):
            assert not (mask_a & mask_b).any(), f"{a} and {b} share pixels"
    cells = embedded.texture_cells()
    for split in cells.values():  # every class has cells in every split
        assert {label for label, *_ in split} == set(range(16))


def test_embedded_rejects_other_image_sizes() -> None:
    with pytest.raises(ValueError, match="28x28"):
        build_task("digits", img_size=32)


@pytest.mark.parametrize("name", ["nope", "vtab/not_a_task", "fgvc/imagenet", "vtab"])
def test_unknown_task_names_the_value_and_the_choices(name: str) -> None:
    with pytest.raises(ValueError) as err:
        build_task(name)
    message = str(err.value)
    assert repr(name) in message
    assert "rotation" in message and "smallnorb_ele" in message and "cub" in message


@pytest.fixture
def vtab_root(tmp_path: Path) -> Path:
    """A 'eurosat' task in the NOAH layout: 4 train800, 2 val200, 3 test images, various sizes."""
    write_vtab_task(tmp_path, "eurosat")
    return tmp_path


@pytest.mark.parametrize("protocol, sizes", [("paper", (6, 2, 3)), ("tune", (4, 2, 3))])
def test_vtab_loader(vtab_root: Path, protocol: str, sizes: tuple[int, int, int]) -> None:
    task = build_task("vtab/eurosat", data_root=vtab_root, img_size=32, protocol=protocol)
    assert (task.kind, task.num_classes, task.in_chans, task.img_size) == ("vtab", 10, 3, 32)
    assert (len(task.train), len(task.val), len(task.test)) == sizes
    assert task.test.targets == [6, 7, 8]
    image, label = task.test[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 7
    assert image[0].mean() > image[1].mean()  # red (140) over green (115) survives loading


def test_vtab_missing_folder_or_list_shows_layout(vtab_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"(?s)cifar.*train800val200\.txt.*test\.txt"):
        build_task("vtab/cifar", data_root=vtab_root)
    (vtab_root / "eurosat" / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)test\.txt.*Expected layout.*images/"):
        build_task("vtab/eurosat", data_root=vtab_root)


def test_vtab_bad_lines_and_missing_images(vtab_root: Path) -> None:
    test_list = vtab_root / "eurosat" / "test.txt"
    test_list.write_text("images/test/0006.png seven\n")
    with pytest.raises(ValueError, match=r"test\.txt:1"):
        build_task("vtab/eurosat", data_root=vtab_root)
    test_list.write_text("images/test/missing.png 3\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        build_task("vtab/eurosat", data_root=vtab_root)


def test_every_listed_image_is_checked_before_training(vtab_root: Path) -> None:
    task_dir = vtab_root / "eurosat"
    (task_dir / "images/test/0007.png").unlink()  # missing
    png = (task_dir / "images/test/0008.png").read_bytes()
    (task_dir / "images/test/0008.png").write_bytes(png[: len(png) // 2])  # truncated
    (task_dir / "images/test/0006.png").write_text("not an image")
    (vtab_root / "secret.png").write_bytes(png)
    lines = (task_dir / "test.txt").read_text() + "../secret.png 1\n"
    (task_dir / "test.txt").write_text(lines)
    with pytest.raises(FileNotFoundError) as err:
        build_task("vtab/eurosat", data_root=vtab_root)
    message = str(err.value)
    assert "4 of the 4 images listed in" in message
    for name, problem in [("0006", "not an image"), ("0007", "missing"), ("0008", "truncated PNG")]:
        assert f"{name}.png: {problem}" in message
    assert f"secret.png: outside {task_dir}" in message


def test_a_complete_jpeg_passes_and_a_cut_one_does_not(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    assert image_problem(path, tmp_path) is None
    path.write_bytes(path.read_bytes()[:-500])
    assert image_problem(path, tmp_path) == "truncated JPEG (no end marker)"


FGVC_CASES = {  # name: (folder, image folder inside it)
    "cub": ("CUB_200_2011", "images"),
    "dogs": ("StanfordDogs", "Images"),
    "flowers": ("OxfordFlowers", ""),
}


def _make_fgvc(root: Path, name: str) -> None:
    """VPT layout with non-contiguous class ids 3, 7, 9 (remapped to 0, 1, 2)."""
    folder, image_dir = FGVC_CASES[name]
    splits = {"train": [3, 7, 9, 3], "val": [7, 9], "test": [9, 3, 7]}
    for split, class_ids in splits.items():
        anno = {}
        for i, class_id in enumerate(class_ids):
            relative = f"{class_id:03d}.class/{split}_{i}.jpg"
            write_image(root / folder / image_dir / relative, (50, 36 + i), value=10 * class_id)
            anno[relative] = class_id
        (root / folder / f"{split}.json").write_text(json.dumps(anno))


@pytest.mark.parametrize("name", list(FGVC_CASES))
def test_fgvc_loader(tmp_path: Path, name: str) -> None:
    _make_fgvc(tmp_path, name)
    task = build_task(f"fgvc/{name}", data_root=tmp_path, img_size=32)
    assert (task.kind, task.in_chans, task.img_size) == ("fgvc", 3, 32)
    assert (len(task.train), len(task.val), len(task.test)) == (4, 2, 3)
    assert task.train.targets == [0, 1, 2, 0] and task.test.targets == [2, 0, 1]
    for split in (task.train, task.test):
        image, label = split[0]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)


def test_fgvc_missing_files_show_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"(?s)CUB_200_2011.*train\.json.*images/"):
        build_task("fgvc/cub", data_root=tmp_path)
    _make_fgvc(tmp_path, "cub")
    (tmp_path / "CUB_200_2011" / "val.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"val\.json"):
        build_task("fgvc/cub", data_root=tmp_path)
