"""Tests for util/datasets.py: split resolution, error messages, bad images, transforms, reproducible loading."""

from __future__ import annotations

import logging
import random
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler
from torchvision.datasets import ImageFolder

from util.datasets import (
    SafeImageFolder,
    TFRandomResizedCrop,
    build_dataset,
    build_loader,
    check_min_images,
    eval_transform,
    finetune_transform,
    knn_transform,
    linprobe_transform,
    mix_seed,
    pretrain_transform,
    resolve_split_root,
    seed_loader_epoch,
)
from util.errors import UserError

FT_ARGS = Namespace(input_size=32, color_jitter=None, aa="rand-m9-mstd0.5-inc1", reprob=0.25, remode="pixel",
                    recount=1)


@pytest.fixture()
def small_copy(demo_root: Path, tmp_path: Path) -> Path:
    """Writable copy of two demo classes (train only): tmp/train/{00_hstripes (jpg), 01_vstripes (png)}."""
    for name in ("00_hstripes", "01_vstripes"):
        shutil.copytree(demo_root / "train" / name, tmp_path / "train" / name)
    return tmp_path


# ---- resolve_split_root ----------------------------------------------------------------------------------------


def test_resolve_prefers_split_folder(demo_root: Path) -> None:
    assert resolve_split_root(str(demo_root), "train", allow_root=False) == demo_root / "train"
    assert resolve_split_root(str(demo_root), "val", allow_root=True) == demo_root / "val"


def test_resolve_accepts_imagefolder_root_only_when_allowed(demo_root: Path) -> None:
    direct = demo_root / "train"  # holds class folders directly, like the seed commands' .../image_folders
    assert resolve_split_root(str(direct), "train", allow_root=True) == direct
    with pytest.raises(UserError, match=r"--data_path .*train has no train/ folder"):
        resolve_split_root(str(direct), "train", allow_root=False)


def test_resolve_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--data_path .*nope does not exist"):
        resolve_split_root(str(tmp_path / "nope"), "train", allow_root=True)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        resolve_split_root(str(tmp_path / "file.txt"), "train", allow_root=True)
    # Class folders without images, both via train/ and directly.
    (tmp_path / "ds" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "ds" / "train" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"no image files found in class sub-folders \(expected .*/train/<class>"):
        resolve_split_root(str(tmp_path / "ds"), "train", allow_root=False)
    (tmp_path / "flat" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match=r"no image files found .* or .*flat/<class>/\*\.jpg"):
        resolve_split_root(str(tmp_path / "flat"), "train", allow_root=True)
    # Eval split missing.
    with pytest.raises(UserError, match=r"--data_path .*ds has no val/ folder"):
        resolve_split_root(str(tmp_path / "ds"), "val", allow_root=False)


# ---- SafeImageFolder -------------------------------------------------------------------------------------------


def test_matches_torchvision_imagefolder(demo_root: Path) -> None:
    ours = build_dataset(str(demo_root), "train", transform=None)
    ref = ImageFolder(str(demo_root / "train"))
    assert ours.classes == ref.classes and ours.class_to_idx == ref.class_to_idx
    assert ours.samples == ref.samples and ours.targets == ref.targets
    img, target = ours[9]
    assert target == ref.targets[9] and img.size == (32, 32) and img.mode == "RGB"


def test_hidden_folders_are_not_classes(small_copy: Path) -> None:
    (small_copy / "train" / ".ipynb_checkpoints").mkdir()
    assert build_dataset(str(small_copy), "train", None).classes == ["00_hstripes", "01_vstripes"]


def test_empty_class_folder_is_user_error(small_copy: Path) -> None:
    (small_copy / "train" / "02_empty").mkdir()
    with pytest.raises(UserError, match="02_empty"):
        build_dataset(str(small_copy), "train", None)


def test_with_index(demo_root: Path) -> None:
    ds = build_dataset(str(demo_root), "val", knn_transform(32), with_index=True)
    img, idx = ds[5]
    assert idx == 5 and img.shape == (3, 32, 32)


def _corrupt(small_copy: Path) -> tuple[Path, Path]:
    """Make sample 1 garbage and sample 2 a truncated JPEG; return their paths."""
    files = sorted((small_copy / "train" / "00_hstripes").iterdir())
    files[1].write_bytes(b"this is not an image")
    files[2].write_bytes(files[2].read_bytes()[:200])
    return files[1], files[2]


def test_corrupt_image_fails_naming_the_file(small_copy: Path) -> None:
    garbage, truncated = _corrupt(small_copy)
    ds = build_dataset(str(small_copy), "train", None)
    ds[0]  # readable images still load
    with pytest.raises(UserError, match=rf"cannot read image .*{garbage.name}.*--bad_images skip"):
        ds[1]
    with pytest.raises(UserError, match=truncated.name):
        ds[2]


def test_corrupt_image_skip(small_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    garbage, truncated = _corrupt(small_copy)
    ds = build_dataset(str(small_copy), "train", None, bad_images="skip", with_index=True)
    reference = build_dataset(str(small_copy), "train", None)
    with caplog.at_level(logging.WARNING):
        img, idx = ds[1]
        again, idx_again = ds[1]
    assert idx == idx_again == 3  # 1 and 2 are unreadable; the next readable sample is 3
    assert np.array_equal(np.asarray(img), np.asarray(reference[3][0]))
    assert ds.num_skipped == 4  # two accesses x two bad files
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2  # once per file, not once per access
    assert any(garbage.name in m for m in warned) and any(truncated.name in m for m in warned)


def test_bad_images_value_checked(demo_root: Path) -> None:
    with pytest.raises(UserError, match="--bad_images"):
        build_dataset(str(demo_root), "train", None, bad_images="ignore")


def test_check_min_images(demo_root: Path) -> None:
    ds = build_dataset(str(demo_root), "val", None)  # 4 classes x 4
    check_min_images(ds, 16, "--batch_size")
    with pytest.raises(UserError, match=r"--batch_size: needs at least 17 images .* has only 16"):
        check_min_images(ds, 17, "--batch_size")


# ---- transforms ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pretrain", "ft_train", "ft_eval", "lin_train", "lin_eval", "knn"])
def test_transform_shapes(demo_root: Path, name: str) -> None:
    tf = {
        "pretrain": pretrain_transform(32),
        "ft_train": finetune_transform(True, FT_ARGS),
        "ft_eval": finetune_transform(False, FT_ARGS),
        "lin_train": linprobe_transform(True, 32),
        "lin_eval": linprobe_transform(False, 32),
        "knn": knn_transform(32),
    }[name]
    img, _ = build_dataset(str(demo_root), "train", tf)[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert -3.0 < img.mean().item() < 3.0  # normalised, not raw 0..1 or 0..255


def test_resize_conventions() -> None:
    assert eval_transform(224).transforms[0].size == 256  # MAE: int(224 / (224/256))
    assert eval_transform(32).transforms[0].size == 36
    assert eval_transform(384).transforms[0].size == 384  # crop_pct 1 above 224
    assert knn_transform(224).transforms[0].size == 256  # DINO
    assert knn_transform(32).transforms[0].size == 37  # round(32 * 256 / 224)
    assert "bicubic" in repr(finetune_transform(True, FT_ARGS)).lower()


def test_tf_crop_never_falls_back_to_centre() -> None:
    img = torch.zeros(3, 40, 60)
    torch.manual_seed(0)
    boxes = [TFRandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(300)]
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60 and h >= 1 and w >= 1
    assert len(set(boxes)) > 250


# ---- seeded augmentation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tf_name", ["pretrain", "finetune"])
def test_seeded_augmentation_is_function_of_seed_epoch_index(demo_root: Path, tf_name: str) -> None:
    def make() -> SafeImageFolder:
        tf = pretrain_transform(32) if tf_name == "pretrain" else finetune_transform(True, FT_ARGS)
        return build_dataset(str(demo_root), "train", tf, seed=123)

    a, b = make(), make()
    a.set_epoch(3)
    b.set_epoch(3)
    idx = range(8)  # several samples, so every RNG the pipeline draws from (torch, random, numpy) is exercised
    x = torch.stack([a[i][0] for i in idx])
    torch.rand(7), random.random(), np.random.rand()  # disturb every global RNG the transforms use
    b[20]  # and the order of access
    assert torch.equal(x, torch.stack([b[i][0] for i in reversed(idx)]).flip(0))
    b.set_epoch(4)
    assert not torch.equal(x[0], b[0][0])
    c = make()
    c.seed = 124
    c.set_epoch(3)
    assert not torch.equal(x[0], c[0][0])


def test_seeded_augmentation_restores_global_torch_and_random(demo_root: Path) -> None:
    ds = build_dataset(str(demo_root), "train", pretrain_transform(32), seed=0)
    torch.manual_seed(1)
    random.seed(1)
    ds[0]
    after = (torch.rand(3), random.random())
    torch.manual_seed(1)
    random.seed(1)
    assert torch.equal(after[0], torch.rand(3)) and after[1] == random.random()


def test_unseeded_augmentation_varies(demo_root: Path) -> None:
    ds = build_dataset(str(demo_root), "train", pretrain_transform(32))
    assert not all(torch.equal(ds[5][0], ds[5][0]) for _ in range(3))


# ---- loader ----------------------------------------------------------------------------------------------------


def _epoch_batches(loader: torch.utils.data.DataLoader, seed: int, epoch: int) -> list[torch.Tensor]:
    seed_loader_epoch(loader, seed, epoch, rank=0)
    return [x for x, _ in loader]


def test_loader_resume_is_bit_exact(demo_root: Path) -> None:
    def loader(num_workers: int) -> torch.utils.data.DataLoader:
        ds = build_dataset(str(demo_root), "train", pretrain_transform(32), seed=7)
        return build_loader(ds, batch_size=8, shuffle=True, drop_last=True, num_workers=num_workers,
                            pin_mem=True, seed=7, distributed=False)

    straight = loader(0)
    assert isinstance(straight.sampler, DistributedSampler)
    e0 = _epoch_batches(straight, 7, 0)
    e1 = _epoch_batches(straight, 7, 1)
    resumed = _epoch_batches(loader(0), 7, 1)  # fresh process state, starting at epoch 1
    assert len(e1) == 4 and all(torch.equal(p, q) for p, q in zip(e1, resumed))
    assert not torch.equal(e0[0], e1[0])
    # Worker processes give the same batches: augmentation does not depend on where the sample is loaded.
    workers = _epoch_batches(loader(2), 7, 1)
    assert all(torch.equal(p, q) for p, q in zip(e1, workers))


def test_loader_shards_and_seeds(demo_root: Path) -> None:
    ds = build_dataset(str(demo_root), "train", None)
    loaders = [build_loader(ds, 4, shuffle=True, drop_last=False, num_workers=0, pin_mem=False, seed=3,
                            distributed=True, world_size=2, rank=r) for r in range(2)]
    shards = []
    for r, ld in enumerate(loaders):
        seed_loader_epoch(ld, 3, 5, rank=r)
        assert ld.generator.initial_seed() == mix_seed(3, 5, r)
        shards.append(list(ld.sampler))
    assert len(shards[0]) == len(shards[1]) == 16
    assert sorted(shards[0] + shards[1]) == list(range(32))
    assert ds.epoch == 5
    seq = build_loader(ds, 4, shuffle=False, drop_last=False, num_workers=0, pin_mem=False, seed=3,
                       distributed=False, world_size=2, rank=1)
    assert list(seq.sampler) == list(range(32))  # not distributed: every rank reads everything in order
