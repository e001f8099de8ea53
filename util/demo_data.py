"""Procedurally generated, labelled ImageFolder for demos and tests.

The set has up to 10 texture classes whose local gradient-orientation statistics differ (stripes at four
orientations, checkerboard, rings, spokes, dot grid, diagonal crosshatch, smooth blobs), so a HOG target, a k-NN
probe or a linear probe can learn something real from it in seconds on a CPU. Every image draws its own colour
pair, frequency, phase, rotation jitter, waveform sharpness and noise level from a generator seeded by
``(seed, class, split, image)``, so the bytes are identical on every rerun with the same parameters.

Layout written by :func:`make_demo_dataset`::

    root/
      .demo_complete.json          # generation parameters; written last
      train/00_hstripes/00_hstripes_train_0000.jpg ...
      val/00_hstripes/...
      train/01_vstripes/01_vstripes_train_0000.png ...   # even classes JPEG, odd classes PNG

Command line: ``python util/demo_data.py --root X`` makes the set (or reuses it) and prints its path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

if __package__ in (None, ""):
    # Run as ``python util/demo_data.py``: make the repo root importable so ``util.errors`` resolves.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from util.errors import UserError, check  # noqa: E402


MARKER = ".demo_complete.json"
ENV_VAR = "VITFREEZE_DEMO_DIR"

# The one tiny architecture every script's --demo uses (pre-training and the evaluators derive theirs from it):
# 32 px demo images, patch 4 (an 8 x 8 grid), 6 blocks x 96 wide, 3 heads.
DEMO_ARCH = dict(input_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3)
# Bump whenever the pixels change, so a cached set made by older code is regenerated.
GENERATOR_VERSION = 1
_SPLITS = ("train", "val")
# Leftover temp dirs older than this are from an interrupted run (generation takes seconds), so delete them.
_STALE_TMP_S = 3600.0

Pattern = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


# --------------------------------------------------------------------------------------------------------------
# Patterns. Each maps centred, rotation-jittered coordinates (x, y in image widths, roughly [-0.5, 0.5]) to an
# intensity map in [0, 1] of the same shape. Frequencies are in cycles per image, so the look does not depend on
# the pixel size (at 32 px the highest frequency still has a period of 4 px).
# --------------------------------------------------------------------------------------------------------------


def _wave(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Periodic profile between a sine and a square wave (random sharpness), in [0, 1]."""
    sharp = rng.uniform(1.0, 6.0)
    return 0.5 + 0.5 * np.tanh(sharp * np.sin(t)) / np.tanh(sharp)


def _freq(rng: np.random.Generator) -> float:
    return rng.uniform(3.0, 7.5)


def _phase(rng: np.random.Generator) -> float:
    return rng.uniform(0.0, 2.0 * np.pi)


def _hstripes(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _wave(2 * np.pi * _freq(rng) * y + _phase(rng), rng)


def _vstripes(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _wave(2 * np.pi * _freq(rng) * x + _phase(rng), rng)


def _diag45(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _wave(2 * np.pi * _freq(rng) * (x + y) / np.sqrt(2) + _phase(rng), rng)


def _diag135(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _wave(2 * np.pi * _freq(rng) * (x - y) / np.sqrt(2) + _phase(rng), rng)


def _checker(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    f = rng.uniform(2.0, 5.0)
    prod = np.sin(2 * np.pi * f * x + _phase(rng)) * np.sin(2 * np.pi * f * y + _phase(rng))
    sharp = rng.uniform(4.0, 12.0)
    return 0.5 + 0.5 * np.tanh(sharp * prod) / np.tanh(sharp)


def _centre(rng: np.random.Generator) -> tuple[float, float]:
    # Off-centre by a little, so rings/spokes are not pixel-identical across images.
    return rng.uniform(-0.12, 0.12), rng.uniform(-0.12, 0.12)


def _rings(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cx, cy = _centre(rng)
    r = np.hypot(x - cx, y - cy)
    return _wave(2 * np.pi * _freq(rng) * r + _phase(rng), rng)


def _spokes(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cx, cy = _centre(rng)
    theta = np.arctan2(y - cy, x - cx)
    n_spokes = int(rng.integers(6, 15))  # integer, so the pattern closes without a seam
    return _wave(n_spokes * theta + _phase(rng), rng)


def _dots(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    f = rng.uniform(3.0, 6.0)
    # Distance (in periods) to the nearest lattice point of a shifted square grid.
    dx = np.mod(f * x + rng.uniform(0, 1), 1.0) - 0.5
    dy = np.mod(f * y + rng.uniform(0, 1), 1.0) - 0.5
    radius = rng.uniform(0.18, 0.32)
    return 1.0 / (1.0 + np.exp((np.hypot(dx, dy) - radius) * rng.uniform(20.0, 60.0)))


def _crosshatch(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    f = rng.uniform(2.5, 5.5)
    power = rng.uniform(6.0, 16.0)  # higher power: thinner lines
    a = np.abs(np.cos(np.pi * f * (x + y) / np.sqrt(2) + _phase(rng))) ** power
    b = np.abs(np.cos(np.pi * f * (x - y) / np.sqrt(2) + _phase(rng))) ** power
    return np.maximum(a, b)


def _blobs(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Smooth noise: a coarse random grid upsampled bicubically; no dominant orientation, low gradient energy.
    h, w = x.shape
    cells = int(rng.integers(3, 6))
    coarse = rng.uniform(0.0, 1.0, size=(cells, cells)).astype(np.float32)
    up = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float64)
    lo, hi = up.min(), up.max()
    return (up - lo) / max(hi - lo, 1e-6)


CLASSES: tuple[tuple[str, Pattern], ...] = (
    ("00_hstripes", _hstripes),
    ("01_vstripes", _vstripes),
    ("02_diag45", _diag45),
    ("03_diag135", _diag135),
    ("04_checker", _checker),
    ("05_rings", _rings),
    ("06_spokes", _spokes),
    ("07_dots", _dots),
    ("08_crosshatch", _crosshatch),
    ("09_blobs", _blobs),
)


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two RGB colours (0..255) at least ~90 apart, so the pattern is never invisible."""
    while True:
        c0, c1 = rng.uniform(0.0, 255.0, size=(2, 3))
        if np.linalg.norm(c1 - c0) > 90.0:
            return c0, c1


def render_image(class_idx: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one image of a class.

    Args:
        class_idx: Index into :data:`CLASSES`.
        size: Side length in pixels.
        rng: Source of every random choice for this image.

    Returns:
        uint8 array of shape [size, size, 3].
    """
    _, pattern = CLASSES[class_idx]
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size - 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    angle = np.deg2rad(rng.uniform(-8.0, 8.0))  # small jitter: classes stay >= 29 degrees apart
    cos_a, sin_a = np.cos(angle), np.sin(angle)
    x = cos_a * xx - sin_a * yy
    y = sin_a * xx + cos_a * yy
    t = pattern(x, y, rng)
    c0, c1 = _colour_pair(rng)
    img = c0 + t[..., None] * (c1 - c0)
    img = img + rng.normal(0.0, rng.uniform(2.0, 12.0), size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _params(num_classes: int, train_per_class: int, val_per_class: int, size: int, seed: int) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "num_classes": num_classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "size": size,
        "seed": seed,
    }


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(root: Path, params: dict) -> bool:
    return _read_marker(root) == params


def _require_replaceable(root: Path) -> None:
    """Refuse to replace a non-empty directory that this module did not write (it may hold the user's data)."""
    if not root.exists():
        return
    check(root.is_dir(), f"demo data root {root} exists and is not a directory; choose another path "
                         f"(--root or ${ENV_VAR})")
    if (root / MARKER).exists() or not any(root.iterdir()):
        return
    raise UserError(f"demo data root {root} is a non-empty directory without {MARKER}, so it is not a demo set; "
                    f"choose a new or empty directory (--root or ${ENV_VAR}) or delete it")


def _generate(out: Path, params: dict) -> None:
    """Write every split/class/image under ``out`` (no marker)."""
    size = params["size"]
    for split_idx, split in enumerate(_SPLITS):
        n_per_class = params[f"{split}_per_class"]
        for class_idx in range(params["num_classes"]):
            name = CLASSES[class_idx][0]
            class_dir = out / split / name
            class_dir.mkdir(parents=True)
            # Mix formats so both decoders are exercised by every consumer.
            ext = "jpg" if class_idx % 2 == 0 else "png"
            for i in range(n_per_class):
                # One generator per image: the image does not depend on the order of generation or on the counts.
                rng = np.random.default_rng([params["seed"], class_idx, split_idx, i])
                pil = Image.fromarray(render_image(class_idx, size, rng))
                path = class_dir / f"{name}_{split}_{i:04d}.{ext}"
                if ext == "jpg":
                    pil.save(path, format="JPEG", quality=92)
                else:
                    pil.save(path, format="PNG")


def _remove_stale_tmp(root: Path) -> None:
    now = time.time()
    for p in root.parent.glob(f".{root.name}.tmp-*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass  # another process removed it first


def _install(tmp: Path, root: Path, params: dict) -> None:
    """Move the finished ``tmp`` into place as ``root``; keep ``root`` if a racing process completed it first.

    ``os.rename`` of a directory is atomic and succeeds only if ``root`` is absent or empty, so readers never see a
    half-written set. A stale demo set (other params) is renamed aside and deleted.
    """
    for _ in range(10):
        if _is_complete(root, params):
            return  # someone else (e.g. another DDP rank) finished first; their bytes equal ours
        try:
            os.rename(tmp, root)
            return
        except OSError:
            pass
        if _is_complete(root, params):
            return
        _require_replaceable(root)
        trash = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(root, trash)
        except FileNotFoundError:
            continue  # vanished under us; retry the install
        shutil.rmtree(trash, ignore_errors=True)
    raise RuntimeError(f"could not install demo data at {root}: it keeps changing under concurrent writers")


def make_demo_dataset(root: str | Path, num_classes: int = 10, train_per_class: int = 40, val_per_class: int = 10,
                      size: int = 64, seed: int = 0) -> Path:
    """Create (or reuse) the demo ImageFolder at ``root``.

    If ``root/.demo_complete.json`` records the same parameters, returns at once. Otherwise generates into a
    temporary sibling directory, writes the marker last and renames the directory into place, so an interrupted
    run leaves no half-written ``root`` and two processes racing (e.g. two DDP ranks) both end with one complete
    set. Changing any parameter regenerates the set (the old one is deleted).

    Args:
        root: Target directory; must be absent, empty, or a demo set made by this function.
        num_classes: Number of classes, 1..10 (see :data:`CLASSES`).
        train_per_class: Images per class in ``train/``.
        val_per_class: Images per class in ``val/``.
        size: Image side length in pixels (square RGB images), at least 8.
        seed: Base seed; the same parameters give byte-identical files.

    Returns:
        ``root`` as an absolute :class:`~pathlib.Path`.

    Raises:
        UserError: Bad parameters, or ``root`` is a non-empty directory that is not a demo set.
    """
    root = Path(root).expanduser().absolute()
    check(1 <= num_classes <= len(CLASSES),
          f"--num_classes must be in 1..{len(CLASSES)} for the demo set, got {num_classes}")
    check(train_per_class >= 1, f"--train_per_class must be >= 1, got {train_per_class}")
    check(val_per_class >= 1, f"--val_per_class must be >= 1, got {val_per_class}")
    check(size >= 8, f"--size must be >= 8 pixels, got {size}")
    params = _params(num_classes, train_per_class, val_per_class, size, seed)
    if _is_complete(root, params):
        return root
    _require_replaceable(root)  # fail before spending time on generation
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _generate(tmp, params)
        (tmp / MARKER).write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")
        _install(tmp, root, params)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def default_demo_root() -> Path:
    """``$VITFREEZE_DEMO_DIR`` if set, else ``<repo root>/demo_data`` (git-ignored)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().absolute()
    return Path(__file__).resolve().parent.parent / "demo_data"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: make the demo set and print its path. Returns the exit status."""
    from util.args import ArgumentParser, integer
    parser = ArgumentParser(description="Generate the procedural demo ImageFolder (train/ and val/).")
    parser.add_argument("--root", default=None, help=f"target directory (default: ${ENV_VAR} or <repo>/demo_data)")
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--train_per_class", type=int, default=40)
    parser.add_argument("--val_per_class", type=int, default=10)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, domain=integer(0, 2147483647), defines_run=True)
    args = parser.parse_args(argv)
    try:
        root = make_demo_dataset(args.root if args.root else default_demo_root(), args.num_classes,
                                 args.train_per_class, args.val_per_class, args.size, args.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
