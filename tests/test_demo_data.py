"""Tests for util/demo_data.py: layout, determinism, caching/race safety, and HOG-separable classes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from util import demo_data
from util.demo_data import CLASSES, MARKER, default_demo_root, make_demo_dataset
from util.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(num_classes=3, train_per_class=2, val_per_class=1, size=16, seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- layout ----------------------------------------------------------------------------------------------------


def test_layout_counts_and_formats(demo_root: Path) -> None:
    names = [c[0] for c in CLASSES[:4]]
    assert names == ["00_hstripes", "01_vstripes", "02_diag45", "03_diag135"]
    for split, n in (("train", 8), ("val", 4)):
        assert sorted(p.name for p in (demo_root / split).iterdir()) == names
        for k, name in enumerate(names):
            files = sorted((demo_root / split / name).iterdir())
            assert len(files) == n
            for f in files:
                with Image.open(f) as im:
                    # Even classes JPEG, odd PNG, judged by the decoder, not just the suffix.
                    assert im.format == ("JPEG" if k % 2 == 0 else "PNG")
                    assert im.mode == "RGB" and im.size == (32, 32)
    marker = json.loads((demo_root / MARKER).read_text())
    assert marker["num_classes"] == 4 and marker["size"] == 32 and marker["train_per_class"] == 8


def test_images_vary_within_a_class(demo_root: Path) -> None:
    files = sorted((demo_root / "train" / "01_vstripes").iterdir())
    arrays = [np.asarray(Image.open(f), dtype=np.float64) for f in files]
    means = np.array([a.mean(axis=(0, 1)) for a in arrays])
    assert means.std(axis=0).max() > 10  # random colour pairs, not one template
    assert not np.array_equal(arrays[0], arrays[1])


# ---- determinism and caching -----------------------------------------------------------------------------------


def test_same_params_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = _files(make_demo_dataset(tmp_path / "a", **SMALL))
    b = _files(make_demo_dataset(tmp_path / "b", **SMALL))
    c = _files(make_demo_dataset(tmp_path / "c", **{**SMALL, "seed": 1}))
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if not k.endswith(MARKER)]
    assert all(a[k] != c[k] for k in images)


def test_marker_caches_and_param_change_regenerates(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "d", **SMALL)
    victim = next((root / "train" / "00_hstripes").iterdir())
    victim.unlink()
    # Same params: the marker says complete, so nothing is rewritten (the deleted file stays deleted).
    assert make_demo_dataset(root, **SMALL) == root
    assert not victim.exists()
    # Other params: regenerated from scratch.
    make_demo_dataset(root, **{**SMALL, "train_per_class": 3})
    assert len(list((root / "train" / "00_hstripes").iterdir())) == 3
    assert json.loads((root / MARKER).read_text())["train_per_class"] == 3
    assert not list(tmp_path.glob(".d.*"))  # no temp or trash siblings left behind


def test_no_marker_means_incomplete(tmp_path: Path) -> None:
    # An empty directory (e.g. pre-created by the user) is filled in.
    (tmp_path / "empty").mkdir()
    root = make_demo_dataset(tmp_path / "empty", **SMALL)
    assert (root / MARKER).exists()
    # A non-empty directory without a marker is not ours: refuse rather than delete someone's data.
    other = tmp_path / "user_data"
    (other / "cats").mkdir(parents=True)
    (other / "cats" / "1.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="not a demo set"):
        make_demo_dataset(other, **SMALL)
    assert (other / "cats" / "1.jpg").read_bytes() == b"x"


def test_race_keeps_the_set_that_appeared_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "raced"
    real_generate = demo_data._generate
    calls = []

    def generate_while_other_rank_finishes(out: Path, params: dict) -> None:
        real_generate(out, params)
        if not calls:  # the "other rank" completes the same set while we are still writing ours
            calls.append(out)
            other = make_demo_dataset(root, **SMALL)
            (other / "sentinel").write_text("first")

    monkeypatch.setattr(demo_data, "_generate", generate_while_other_rank_finishes)
    assert make_demo_dataset(root, **SMALL) == root.absolute()
    assert (root / "sentinel").read_text() == "first"  # kept, not replaced
    assert not calls[0].exists()  # our temp copy was removed
    assert not list(tmp_path.glob(".raced.*"))


def test_concurrent_processes_end_with_one_complete_set(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    cmd = [sys.executable, str(REPO_ROOT / "util" / "demo_data.py"), "--root", str(root), "--num_classes", "3",
           "--train_per_class", "4", "--val_per_class", "2", "--size", "16"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert all(rc == 0 for _, _, rc in results), results
    assert json.loads((root / MARKER).read_text())["train_per_class"] == 4
    assert sum(1 for _ in (root / "train").rglob("*.*")) == 3 * 4
    assert not list(tmp_path.glob(".shared.*"))


def test_bad_params_raise_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--num_classes"):
        make_demo_dataset(tmp_path / "x", num_classes=11)
    with pytest.raises(UserError, match="--size"):
        make_demo_dataset(tmp_path / "x", size=4)


def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VITFREEZE_DEMO_DIR", raising=False)
    assert default_demo_root() == REPO_ROOT / "demo_data"
    monkeypatch.setenv("VITFREEZE_DEMO_DIR", str(tmp_path / "elsewhere"))
    assert default_demo_root() == tmp_path / "elsewhere"


def test_cli(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO_ROOT / "util" / "demo_data.py"), "--root", str(tmp_path / "cli"),
           "--num_classes", "2", "--train_per_class", "1", "--val_per_class", "1", "--size", "16"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == tmp_path / "cli"
    assert (tmp_path / "cli" / MARKER).exists()
    bad = subprocess.run(cmd[:2] + ["--root", str(tmp_path / "bad"), "--num_classes", "0"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "--num_classes" in bad.stderr and "Traceback" not in bad.stderr


# ---- HOG separability ------------------------------------------------------------------------------------------


def _sobel(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel gradients [H, W] of an RGB uint8 image, taking per pixel the channel with the largest magnitude."""
    a = np.pad(img.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    gx = 2 * (a[1:-1, 2:] - a[1:-1, :-2]) + (a[:-2, 2:] - a[:-2, :-2]) + (a[2:, 2:] - a[2:, :-2])
    gy = 2 * (a[2:, 1:-1] - a[:-2, 1:-1]) + (a[2:, :-2] - a[:-2, :-2]) + (a[2:, 2:] - a[:-2, 2:])
    k = np.hypot(gx, gy).argmax(axis=-1)[..., None]
    return np.take_along_axis(gx, k, -1)[..., 0], np.take_along_axis(gy, k, -1)[..., 0]


def _cell_hog(img: np.ndarray, cells: int = 4, bins: int = 9) -> np.ndarray:
    """Unsigned orientation histograms on a cells x cells grid, each L2-normalised; shape [cells*cells*bins]."""
    gx, gy = _sobel(img)
    mag = np.hypot(gx, gy)
    b = np.minimum((np.mod(np.arctan2(gy, gx), np.pi) / np.pi * bins).astype(int), bins - 1)
    cs = img.shape[0] // cells
    feats = []
    for i in range(cells):
        for j in range(cells):
            sl = (slice(i * cs, (i + 1) * cs), slice(j * cs, (j + 1) * cs))
            h = np.bincount(b[sl].ravel(), mag[sl].ravel(), bins)
            feats.append(h / (np.linalg.norm(h) + 1e-6))
    return np.concatenate(feats)


def test_stripe_orientation_differs(demo_root: Path) -> None:
    def energy_ratio(name: str) -> float:
        """Mean over images of sum(gy^2) / sum(gx^2)."""
        ratios = []
        for f in sorted((demo_root / "train" / name).iterdir()):
            gx, gy = _sobel(np.asarray(Image.open(f).convert("RGB")))
            ratios.append((gy ** 2).sum() / (gx ** 2).sum())
        return float(np.mean(ratios))

    assert energy_ratio("00_hstripes") > 4.0  # intensity changes along y
    assert energy_ratio("01_vstripes") < 0.25
    assert 0.25 < energy_ratio("02_diag45") < 4.0


def test_all_classes_separable_by_hog(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "ten", num_classes=10, train_per_class=8, val_per_class=4, size=32)

    def load(split: str) -> tuple[np.ndarray, np.ndarray]:
        x, y = [], []
        for label, cdir in enumerate(sorted((root / split).iterdir())):
            for f in sorted(cdir.iterdir()):
                x.append(_cell_hog(np.asarray(Image.open(f).convert("RGB"))))
                y.append(label)
        return np.stack(x), np.array(y)

    xt, yt = load("train")
    xv, yv = load("val")
    centroids = np.stack([xt[yt == c].mean(0) for c in range(10)])
    pred = ((xv[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yv).mean() >= 0.7  # chance is 0.1; colour alone carries no class information
