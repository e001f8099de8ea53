"""Dataset plumbing shared by ``run_pretrain.py``, ``run_finetune.py``, ``run_linprobe.py`` and ``run_knn.py``.

* :func:`resolve_split_root` finds ``<data_path>/<split>`` (ImageNet layout) or, for pre-training,
  ``<data_path>`` itself when it directly holds class folders, with one-line :class:`~util.errors.UserError`
  messages for every layout mistake.
* :class:`SafeImageFolder` is a torchvision ``ImageFolder`` that names the file when an image cannot be read
  (or skips it deterministically), can return ``(image, index)`` for k-NN, and can seed augmentation per sample.
* ``*_transform`` build the four transform pipelines (LOCALMIM.md §2.2, §3.2, §4.2, §5.1).
* :func:`build_loader` / :func:`seed_loader_epoch` make the data order and augmentation a pure function of
  ``(seed, epoch)``, so a resumed run sees exactly the batches an uninterrupted run would have seen.

Reproducible augmentation, how the training engine must drive it::

    dataset = build_dataset(args.data_path, "train", pretrain_transform(args.input_size), allow_root=True,
                            seed=args.seed)
    loader = build_loader(dataset, args.batch_size, shuffle=True, drop_last=True, num_workers=args.num_workers,
                          pin_mem=args.pin_mem, seed=args.seed, distributed=args.distributed,
                          world_size=world_size, rank=rank)
    for epoch in range(start_epoch, args.epochs):
        seed_loader_epoch(loader, args.seed, epoch, rank)   # BEFORE iterating: workers copy the dataset
        for samples, targets in loader:
            ...

With ``seed`` given to the dataset, sample ``i`` of epoch ``e`` is augmented by RNGs seeded from
``(seed, e, i)`` only, whatever the rank, world size, worker count or resume point; the global RNGs of the
calling process are restored afterwards, so with ``num_workers=0`` augmentation does not shift the model's own
random stream (e.g. MIM masking). The sampler order is ``DistributedSampler(seed=seed)`` + ``set_epoch(e)``.
"""

from __future__ import annotations

import io
import logging
import math
import os
import random
import signal
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Sized

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import functional as TF

from util.errors import UserError, check

logger = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("fail", "skip")
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------------------------
# Locating the data
# --------------------------------------------------------------------------------------------------------------


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _has_class_images(directory: Path) -> bool:
    """True if some visible sub-folder of ``directory`` directly holds an image file (stops at the first hit)."""
    try:
        subdirs = [e for e in os.scandir(directory) if e.is_dir() and not e.name.startswith(".")]
    except OSError:
        return False
    for sub in subdirs:
        try:
            with os.scandir(sub.path) as it:
                if any(e.is_file() and _is_image_file(e.name) for e in it):
                    return True
        except OSError:
            continue
    return False


def resolve_split_root(data_path: str | Path, split: str, allow_root: bool) -> Path:
    """Find the ImageFolder root for one split.

    Uses ``data_path/split`` if it exists; otherwise, if ``allow_root`` (pre-training, whose seed commands pass an
    ImageFolder root such as ``.../train/image_folders`` directly), ``data_path`` itself when it holds class
    folders with images.

    Args:
        data_path: Value of ``--data_path``.
        split: ``"train"`` or ``"val"``.
        allow_root: Accept ``data_path`` itself as the ImageFolder root when it has no ``split`` sub-folder.

    Returns:
        Directory whose sub-folders are the classes.

    Raises:
        UserError: The path is missing, has no ``split`` folder (and cannot be used directly), or has no images.
    """
    root = Path(data_path).expanduser()
    check(root.exists(), f"--data_path {root} does not exist; pass a folder with train/ and val/ or "
                         f"generate the demo set with `python util/demo_data.py`")
    check(root.is_dir(), f"--data_path {root} is not a directory")
    no_images = (f"--data_path {root}: no image files found in class sub-folders "
                 f"(expected {root}/{split}/<class>/*.jpg" + (f" or {root}/<class>/*.jpg)" if allow_root else ")"))
    split_dir = root / split
    if split_dir.is_dir():
        check(_has_class_images(split_dir), no_images)
        return split_dir
    if allow_root:
        check(_has_class_images(root), no_images)
        return root
    raise UserError(f"--data_path {root} has no {split}/ folder; pass the dataset root that contains "
                    f"{split}/<class>/*.jpg (ImageNet layout: train/ and val/)")


# --------------------------------------------------------------------------------------------------------------
# Per-sample seeding
# --------------------------------------------------------------------------------------------------------------


def mix_seed(*values: int) -> int:
    """Hash integers into one 64-bit seed (splitmix64 chain); nearby inputs give unrelated seeds.

    Args:
        *values: Non-negative integers, e.g. ``(seed, epoch, index)``.

    Returns:
        Integer in ``[0, 2**64)``.
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h


@contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed the CPU torch, ``random`` and ``numpy.random`` global RNGs (all used by torchvision/timm transforms).

    On exit torch and ``random`` are restored exactly. ``numpy.random`` is instead reseeded from one 32-bit draw
    taken from it on entry: saving/restoring its legacy state costs ~100 us, this ~6 us, and the caller's numpy
    stream still depends only on its own state, not on the augmentation.

    Args:
        seed: 64-bit seed, e.g. from :func:`mix_seed`.
    """
    torch_state = torch.get_rng_state()
    py_state = random.getstate()
    np_resume = int(np.random.randint(0, 2**32, dtype=np.uint64))
    # The default CPU generator only: torch.manual_seed would also seed every accelerator (~130 us) and
    # transforms run on the CPU.
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)  # legacy numpy seeds are 32-bit
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.seed(np_resume)


# --------------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------------


# A read that blocks this long (a hung network file system, a device) fails like an unreadable image.
READ_TIMEOUT_S = 120.0
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


@contextmanager
def read_deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise ``TimeoutError`` (an OSError) if the body blocks for more than ``seconds``.

    Uses SIGALRM, so it only acts in a process's main thread (the main process with ``--num_workers 0``, and every
    DataLoader worker); elsewhere the body runs unguarded.
    """
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"reading {what} blocked for more than {seconds:g} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _read_bytes(path: str) -> bytes:
    """The bytes of a regular file; a FIFO/device (even one that replaced the file after the scan) never blocks."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"not a regular file ({_kind(os.fstat(fd).st_mode)})")
        with read_deadline(READ_TIMEOUT_S, path):
            chunks = []
            while True:
                b = os.read(fd, 1 << 22)
                if not b:
                    break
                chunks.append(b)
    finally:
        os.close(fd)
    return b"".join(chunks)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB 8 bit. 16-bit greyscale (PNG ``I;16``, or ``I`` holding 16-bit values) is scaled by 255/65535 first:
    Pillow's ``convert('RGB')`` clips it instead (99.6% of a full-range image would become 255)."""
    if img.mode in _HIGH_BIT_MODES:
        a = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def _load_rgb(path: str) -> Image.Image:
    img = Image.open(io.BytesIO(_read_bytes(path)))
    return to_rgb(img)  # forces the full decode, so truncated files fail here, inside the try


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def scan_class_folders(directory: str, class_to_idx: dict[str, int],
                       is_valid: Callable[[str], bool]) -> tuple[list[tuple[str, int]], list[str]]:
    """``(samples, warnings)``: torchvision's ``make_dataset`` order (class, then sorted walk), made safe.

    Directory symlinks are followed, but a directory already visited for the class (a loop, or ``x -> .``) is not
    entered again, and a file reached twice through links is counted once. Entries that are not regular files
    (FIFOs, sockets, devices, broken links) are skipped with a warning, so nothing is ever opened that could block.
    """
    instances: list[tuple[str, int]] = []
    warnings: list[str] = []
    for target_class in sorted(class_to_idx):
        target_dir = os.path.join(directory, target_class)
        if not os.path.isdir(target_dir):
            continue
        seen_dirs: set[tuple[int, int]] = set()
        seen_files: set[tuple[int, int]] = set()
        walked = []
        for root, dirs, fnames in os.walk(target_dir, followlinks=True):
            st = os.stat(root)
            if (st.st_dev, st.st_ino) in seen_dirs:
                dirs[:] = []
                warnings.append(f"{root}: a directory already scanned (symlink loop?); not scanned again")
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            walked.append((root, fnames))
        for root, fnames in sorted(walked):
            for fname in sorted(fnames):
                path = os.path.join(root, fname)
                if not is_valid(path):
                    continue
                try:
                    st = os.stat(path)
                except OSError as e:
                    warnings.append(f"{path}: skipped ({e.strerror})")
                    continue
                if not stat.S_ISREG(st.st_mode):
                    warnings.append(f"{path}: skipped, {_kind(st.st_mode)} is not an image file")
                    continue
                if (st.st_dev, st.st_ino) in seen_files:
                    continue
                seen_files.add((st.st_dev, st.st_ino))
                instances.append((path, class_to_idx[target_class]))
    return instances, warnings


class SafeImageFolder(ImageFolder):
    """torchvision ``ImageFolder`` with readable failures, optional skipping, ``(image, index)`` mode and seeding.

    ``samples``, ``targets``, ``classes`` and ``class_to_idx`` mean what they mean in torchvision, except that
    hidden folders (``.ipynb_checkpoints``, ...) are not classes.

    Args:
        root: Directory whose sub-folders are the classes.
        transform: Applied to the PIL RGB image.
        bad_images: ``"fail"``: an unreadable image raises :class:`UserError` naming the file. ``"skip"``: the next
            readable sample (index + 1, + 2, ... wrapping) is returned instead, the skip is counted in
            ``num_skipped`` and a warning is logged once per file. Counts are per process (each loader worker
            has its own copy).
        with_index: Return ``(image, index)`` instead of ``(image, target)`` (k-NN feature scatter). With skipping,
            the index is that of the sample actually returned, so a skipped slot is never written.
        seed: If not None, augment sample ``i`` of epoch ``e`` (see :meth:`set_epoch`) under RNGs seeded by
            ``mix_seed(seed, e, i)``. Measured overhead (2-core CPU): ~40 us per sample, versus ~180 us to
            decode a 64 px demo image, or ~1 ms to decode a 500x375 ImageNet JPEG plus ~1.8 ms for the 224 px
            pre-training transform; i.e. ~1-2 % for ImageNet, negligible.
    """

    def __init__(self, root: str | Path, transform: Optional[Callable] = None, bad_images: str = "fail",
                 with_index: bool = False, seed: Optional[int] = None) -> None:
        check(bad_images in BAD_IMAGE_POLICIES,
              f"--bad_images must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {bad_images!r}")
        try:
            super().__init__(str(root), transform=transform, loader=_load_rgb)
        except FileNotFoundError as e:
            # torchvision raises this for no class folders or a class folder without images.
            raise UserError(f"{root}: {e} (expected {root}/<class>/*.jpg)") from None
        self.bad_images = bad_images
        self.with_index = with_index
        self.seed = seed
        self.epoch = 0
        self.num_skipped = 0
        self._warned: set[str] = set()

    @staticmethod
    def make_dataset(directory: str | Path, class_to_idx: dict[str, int], extensions: Optional[tuple] = None,
                     is_valid_file: Optional[Callable[[str], bool]] = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        """torchvision's scan made safe against symlink loops and non-regular files (:func:`scan_class_folders`)."""
        exts = tuple(extensions or IMG_EXTENSIONS)
        valid = is_valid_file or (lambda p: p.lower().endswith(exts))
        instances, warnings = scan_class_folders(str(directory), class_to_idx, valid)
        for w in warnings[:5]:
            logger.warning("data scan: %s", w)
        if len(warnings) > 5:
            logger.warning("data scan: %d more entries skipped under %s", len(warnings) - 5, directory)
        found = {t for _, t in instances}
        empty = sorted(c for c, i in class_to_idx.items() if i not in found)
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}")
        return instances

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        """Visible sub-folders of ``directory``, sorted; see torchvision ``find_classes``."""
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"no class folders in {directory}")
        return classes, {c: i for i, c in enumerate(classes)}

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch for seeded augmentation. Call before creating the loader iterator for that epoch."""
        self.epoch = int(epoch)

    def _load_readable(self, index: int) -> tuple[Image.Image, int]:
        """Load ``samples[index]`` or, when skipping, the next readable one; returns (image, its index)."""
        n = len(self.samples)
        for step in range(n):
            j = (index + step) % n
            path = self.samples[j][0]
            try:
                return self.loader(path), j
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                # PIL signals corrupt/truncated data with OSError (incl. UnidentifiedImageError) or SyntaxError.
                if self.bad_images == "fail":
                    raise UserError(f"cannot read image {path}: {e}; repair or delete it, or pass "
                                    f"--bad_images skip") from None
                self.num_skipped += 1
                if path not in self._warned:
                    self._warned.add(path)
                    logger.warning("skipping unreadable image %s (%s); using the next readable one", path, e)
        raise UserError(f"{self.root}: none of the {n} images can be read; check the files or --data_path")

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """Return ``(image, target)``, or ``(image, index)`` with ``with_index``."""
        img, j = self._load_readable(index)
        if self.transform is not None:
            if self.seed is None:
                img = self.transform(img)
            else:
                # Keyed on the requested index, so a skip does not change other samples' augmentation.
                with seeded_global_rngs(mix_seed(self.seed, self.epoch, index)):
                    img = self.transform(img)
        if self.with_index:
            return img, j
        target = self.samples[j][1]
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def build_dataset(data_path: str | Path, split: str, transform: Optional[Callable], allow_root: bool = False,
                  bad_images: str = "fail", with_index: bool = False, seed: Optional[int] = None
                  ) -> SafeImageFolder:
    """Resolve the split folder (:func:`resolve_split_root`) and wrap it in a :class:`SafeImageFolder`.

    Args:
        data_path: Value of ``--data_path``.
        split: ``"train"`` or ``"val"``.
        transform: Image transform (see the ``*_transform`` builders).
        allow_root: Accept ``data_path`` itself as the ImageFolder root (pre-training).
        bad_images: ``"fail"`` or ``"skip"``, see :class:`SafeImageFolder`.
        with_index: Return ``(image, index)`` (k-NN).
        seed: Enable per-sample seeded augmentation (drive it with :func:`seed_loader_epoch`).

    Returns:
        The dataset.
    """
    root = resolve_split_root(data_path, split, allow_root)
    return SafeImageFolder(root, transform=transform, bad_images=bad_images, with_index=with_index, seed=seed)


def check_min_images(dataset: Sized, n: int, flag: str) -> None:
    """Raise :class:`UserError` if ``dataset`` has fewer than ``n`` images.

    Args:
        dataset: Any sized dataset (its ``root`` is named in the message when present).
        n: Images needed, e.g. ``batch_size * world_size`` for a ``drop_last`` loader.
        flag: The flag that sets the requirement, e.g. ``"--batch_size"``.
    """
    have = len(dataset)
    where = getattr(dataset, "root", "the dataset")
    check(have >= n, f"{flag}: needs at least {n} images but {where} has only {have}; lower {flag} or use more data")


# --------------------------------------------------------------------------------------------------------------
# Transforms. timm gets the string 'bicubic' (an InterpolationMode enum is a KeyError in timm >= 0.5,
# LOCALMIM.md §7.2 #6); torchvision gets its enum.
# --------------------------------------------------------------------------------------------------------------

_BICUBIC = T.InterpolationMode.BICUBIC


def _normalize() -> T.Normalize:
    return T.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def eval_transform(input_size: int) -> T.Compose:
    """MAE eval: Resize(int(input/crop_pct)) → CenterCrop(input), crop_pct = 224/256 up to 224 px, else 1.

    Args:
        input_size: Output side in pixels.

    Returns:
        PIL image → float tensor [3, input_size, input_size], ImageNet-normalised.
    """
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return T.Compose([
        T.Resize(int(input_size / crop_pct), interpolation=_BICUBIC),
        T.CenterCrop(input_size),
        T.ToTensor(),
        _normalize(),
    ])


def pretrain_transform(input_size: int) -> T.Compose:
    """LocalMIM pre-training: RandomResizedCrop(scale 0.2..1, bicubic) → HFlip → ToTensor → Normalize.

    Args:
        input_size: Output side in pixels.

    Returns:
        PIL image → float tensor [3, input_size, input_size].
    """
    return T.Compose([
        T.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=_BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        _normalize(),
    ])


def finetune_transform(is_train: bool, args: Any) -> Callable:
    """Fine-tuning transform (LOCALMIM.md §3.2, MAE convention, bicubic).

    Args:
        is_train: Training (timm RandAugment pipeline + random erasing) or evaluation (:func:`eval_transform`).
        args: Namespace with ``input_size``, and for training ``color_jitter``, ``aa`` (``None``/``"none"``
            disables auto-augment), ``reprob``, ``remode``, ``recount``.

    Returns:
        PIL image → float tensor [3, input_size, input_size].
    """
    if not is_train:
        return eval_transform(args.input_size)
    aa = args.aa if args.aa not in (None, "", "none", "None") else None
    return pillow_safe_randaugment(create_transform(
        input_size=args.input_size,
        is_training=True,
        color_jitter=args.color_jitter,
        auto_augment=aa,
        interpolation="bicubic",
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    ))


def _posterize_any_bits(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize op, defined for 0 bits as Pillow < 11 did it (every pixel 0) instead of raising."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def pillow_safe_randaugment(transform: Any) -> Any:
    """Make timm RandAugment's ``PosterizeIncreasing`` safe on Pillow >= 11 (returns ``transform``).

    With ``inc1`` and magnitude noise (``mstd0.5``) the magnitude is clipped at 10, which maps to keeping 0 bits;
    Pillow 13 raises "bits must be between or equal to 1 and 8" there, so MAE's default augmentation crashes a few
    images into an epoch. Only that op's function is swapped, on this transform's own op instances.
    """
    for t in getattr(transform, 'transforms', []):
        pillow_safe_randaugment(t)
    for op in getattr(transform, 'ops', []):
        if getattr(op, 'name', '').startswith('Posterize'):
            op.aug_fn = _posterize_any_bits
    return transform


class TFRandomResizedCrop(T.RandomResizedCrop):
    """MAE linear-probe crop (LOCALMIM.md §4.2): one TF/BYOL-style draw, no retry loop.

    Area fraction ~ U(scale), aspect ratio log-uniform in ``ratio``, both sides clamped to the image, uniform
    offset. Unlike torchvision's version it never falls back to a centre crop.
    """

    @staticmethod
    def get_params(img: Any, scale: Sequence[float], ratio: Sequence[float]) -> tuple[int, int, int, int]:
        """Return the crop box ``(top, left, height, width)`` in pixels."""
        width, height = TF.get_image_size(img)
        target_area = height * width * torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w = min(int(round(math.sqrt(target_area * aspect))), width)
        h = min(int(round(math.sqrt(target_area / aspect))), height)
        top = int(torch.randint(0, height - h + 1, size=(1,)).item())
        left = int(torch.randint(0, width - w + 1, size=(1,)).item())
        return top, left, h, w


def linprobe_transform(is_train: bool, input_size: int) -> T.Compose:
    """Linear-probe transform: train TF-style RandomResizedCrop (bicubic) → HFlip; eval :func:`eval_transform`.

    Args:
        is_train: Training or evaluation pipeline.
        input_size: Output side in pixels.

    Returns:
        PIL image → float tensor [3, input_size, input_size].
    """
    if not is_train:
        return eval_transform(input_size)
    return T.Compose([
        TFRandomResizedCrop(input_size, interpolation=_BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        _normalize(),
    ])


def knn_transform(input_size: int) -> T.Compose:
    """DINO k-NN transform, both splits: Resize(round(input*256/224), bicubic) → CenterCrop(input).

    Args:
        input_size: Output side in pixels (224 gives DINO's Resize(256)).

    Returns:
        PIL image → float tensor [3, input_size, input_size].
    """
    return T.Compose([
        T.Resize(round(input_size * 256 / 224), interpolation=_BICUBIC),
        T.CenterCrop(input_size),
        T.ToTensor(),
        _normalize(),
    ])


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool, num_workers: int,
                 pin_mem: bool, seed: int, distributed: bool, world_size: int = 1, rank: int = 0,
                 prefetch_factor: Optional[int] = None) -> DataLoader:
    """DataLoader whose order and worker RNG are functions of ``(seed, epoch)`` (and rank, worker).

    Always uses a ``DistributedSampler(seed=seed, shuffle=shuffle)`` (MAE style), with ``num_replicas=world_size``
    and ``rank`` when ``distributed``, else one replica holding everything (so every rank reads the full set,
    e.g. non-distributed eval). It pads with repeats when the size is not divisible by ``world_size``. The
    loader owns a ``torch.Generator`` that sets the workers' base seed; workers are not persistent, so each
    epoch's workers are seeded afresh. Call :func:`seed_loader_epoch` before every epoch's iteration.

    Args:
        dataset: The dataset (a :class:`SafeImageFolder` with ``seed`` for reproducible augmentation).
        batch_size: Per-process batch size.
        shuffle: Shuffle the order (a different permutation per epoch).
        drop_last: Drop the last incomplete batch.
        num_workers: Loader worker processes (0: load in the main process).
        pin_mem: Pin host memory (ignored without CUDA, where it only warns).
        seed: Base seed of the sampler order and the worker generator.
        distributed: Shard the data over ``world_size`` ranks.
        world_size: Number of ranks.
        rank: This process's rank.
        prefetch_factor: Batches each worker prepares ahead (None: torch's default, 2; workers only).

    Returns:
        The loader; its ``sampler`` and ``generator`` are the ones :func:`seed_loader_epoch` drives.
    """
    if distributed:
        check(world_size >= 1 and 0 <= rank < world_size, f"rank {rank} is not in 0..{world_size - 1}")
        num_replicas, sampler_rank = world_size, rank
    else:
        num_replicas, sampler_rank = 1, 0
    sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=sampler_rank, shuffle=shuffle, seed=seed)
    generator = torch.Generator()
    generator.manual_seed(mix_seed(seed, 0, rank))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=bool(pin_mem and torch.cuda.is_available()),
        drop_last=drop_last,
        generator=generator,
        persistent_workers=False,  # persistent workers would keep the previous epoch's dataset copy and seeds
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )


def seed_loader_epoch(loader: DataLoader, seed: int, epoch: int, rank: int = 0) -> None:
    """Make epoch ``epoch`` of ``loader`` independent of what ran before (e.g. of resuming).

    Sets the sampler epoch (order), the dataset epoch (per-sample augmentation seeds) and reseeds the loader's
    generator with ``mix_seed(seed, epoch, rank)`` (worker ``k``'s torch/random/numpy seeds derive from it and
    ``k``). Must be called before ``iter(loader)`` each epoch, because workers copy the dataset when created.

    Args:
        loader: A loader made by :func:`build_loader`.
        seed: Base seed (same as given to :func:`build_loader`).
        epoch: Epoch about to start (0-based).
        rank: This process's rank.
    """
    if loader.persistent_workers:
        raise ValueError("seed_loader_epoch needs persistent_workers=False (workers must see the new epoch)")
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    dataset = loader.dataset
    while not hasattr(dataset, "set_epoch") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset  # e.g. torch.utils.data.Subset
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(mix_seed(seed, epoch, rank))
