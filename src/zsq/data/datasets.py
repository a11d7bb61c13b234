"""Real evaluation datasets behind one spec string, e.g. ``cifar10:~/data`` or ``npz:test.npz``.

Every dataset yields ``(float32 CHW tensor, int label)`` through the same pixel pipeline
(uint8 -> /255 -> (x - mean) / std) so a teacher sees exactly what it was trained on. Real data
is only for measuring (and for explicitly data-driven baselines): zero-shot methods never train
on it. Given what the model expects (channels, classes, input size), ``load_dataset`` checks the
data fits before anything runs: a mismatch would otherwise end in a shape error mid-run or, for
labels, in a silently wrong accuracy.
"""

from __future__ import annotations

import gzip
import io
import logging
import shutil
import struct
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from zsq.errors import ConfigError, ZsqError

logger = logging.getLogger(__name__)

__all__ = [
    "DOWNLOADABLE",
    "ImageArrayDataset",
    "JpegArrayDataset",
    "eval_transform",
    "head",
    "imagefolder_transform",
    "load_dataset",
    "read_idx",
    "spec_kinds",
    "subset",
]

SPLITS = ("train", "test", "val")
DIGITS_TRAIN_SIZE = 1257  # of 1797: the usual 70/30 split, fixed by a seeded permutation
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGENET_SIZE = 224  # the one input size the 256 -> 224 resize/centre-crop convention is for
IMAGENET_RESIZE = 256
DOWNLOADABLE = ("cifar10", "cifar100", "fashion-mnist")  # kinds torchvision can fetch
Sample = tuple[torch.Tensor, int]


class _Mismatch(ConfigError):
    """The data does not fit the model; ``load_dataset`` names the dataset in the message."""


class _NormalizedImages(Dataset):
    """Turns one stored image (HWC uint8, or float already in [0, 1]) into a normalised tensor.

    ``model_channels``, when given, must equal the images' channel count (checked before the
    normalisation, whose length error would point at the wrong fix).
    """

    eval_transform = "none: images at their stored size, /255, normalised"

    def __init__(
        self,
        labels: np.ndarray,
        channels: int,
        normalize_mean: Sequence[float] | None,
        normalize_std: Sequence[float] | None,
        model_channels: int | None = None,
    ) -> None:
        if model_channels is not None and channels != model_channels:
            raise _Mismatch(
                f"its images have {channels} channel(s) but the model takes {model_channels}; "
                f"use {model_channels}-channel data, or the model («in_channels») built for it"
            )
        self.labels = np.asarray(labels, dtype=np.int64)
        self.channels = channels
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.mean = _per_channel(normalize_mean, 0.0, channels, "normalize_mean")
        self.std = _per_channel(normalize_std, 1.0, channels, "normalize_std")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Sample:
        pixels = self._image(index)
        if not (pixels.flags.writeable and pixels.flags.c_contiguous):
            pixels = np.array(pixels)  # torch.from_numpy wants writable, contiguous memory
        image = torch.from_numpy(pixels).permute(2, 0, 1)
        # out of place: a float32 image shares memory with the stored array
        x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        return (x - self.mean) / self.std, int(self.labels[index])

    def _image(self, index: int) -> np.ndarray:
        raise NotImplementedError


class ImageArrayDataset(_NormalizedImages):
    """Images held in memory as an ``(N, H, W, C)`` array (uint8 pixels or floats in [0, 1])."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        normalize_mean: Sequence[float] | None = None,
        normalize_std: Sequence[float] | None = None,
        model_channels: int | None = None,
    ) -> None:
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or len(images) != len(labels):
            raise ZsqError(
                f"images must be (N, H, W[, C]) with one label each, got images {images.shape} and "
                f"{len(labels)} labels; fix the array shapes"
            )
        super().__init__(labels, images.shape[-1], normalize_mean, normalize_std, model_channels)
        self.images = images

    def _image(self, index: int) -> np.ndarray:
        return self.images[index]


class JpegArrayDataset(_NormalizedImages):
    """JPEG files concatenated in one byte array, decoded on first access and then cached.

    Decoding lazily means a 512-image calibration subset of a 50k training set decodes 512
    images; decoding 10k CIFAR images costs ~1.6 s on one core, small next to evaluating them.
    """

    def __init__(
        self,
        jpeg: np.ndarray,
        offsets: np.ndarray,
        labels: np.ndarray,
        normalize_mean: Sequence[float] | None = None,
        normalize_std: Sequence[float] | None = None,
        model_channels: int | None = None,
    ) -> None:
        if len(offsets) != len(labels) + 1:
            raise ZsqError(
                f"JPEG data has {len(offsets)} offsets for {len(labels)} labels (need N+1); "
                "rebuild the .npz file"
            )
        super().__init__(labels, 3, normalize_mean, normalize_std, model_channels)
        self.jpeg = jpeg
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self._cache: dict[int, np.ndarray] = {}

    def _image(self, index: int) -> np.ndarray:
        image = self._cache.get(index)
        if image is None:
            image = self._decode(index)
            self._cache[index] = image
        return image

    def _decode(self, index: int) -> np.ndarray:
        from PIL import Image

        start, end = self.offsets[index], self.offsets[index + 1]
        with Image.open(io.BytesIO(self.jpeg[start:end].tobytes())) as img:
            return np.array(img.convert("RGB"))


def _per_channel(
    values: Sequence[float] | None, default: float, channels: int, what: str
) -> torch.Tensor:
    """A (C, 1, 1) tensor; a single value is used for every channel."""
    values = [default] if values is None else [float(v) for v in values]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ZsqError(
            f"{what} has {len(values)} values but the images have {channels} channels; give one "
            "value per channel (use the teacher's normalisation)"
        )
    if what == "normalize_std" and any(v <= 0 for v in values):
        raise ConfigError(f"«normalize_std» must be positive, got {values}; fix it")
    return torch.tensor(values, dtype=torch.float32).view(channels, 1, 1)


# --- spec parsing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    """Everything a loader may need; each loader reads the fields that apply to it."""

    path: Path | None
    split: str
    normalize_mean: Sequence[float] | None
    normalize_std: Sequence[float] | None
    download: bool = False
    image_size: int | None = None
    channels: int | None = None

    @property
    def norm(self) -> dict[str, Any]:
        """Keyword arguments of the array datasets: normalisation and the channel check."""
        return {
            "normalize_mean": self.normalize_mean,
            "normalize_std": self.normalize_std,
            "model_channels": self.channels,
        }

    @property
    def train(self) -> bool:
        return self.split == "train"


def spec_kinds() -> list[str]:
    """The dataset spec schemes ``load_dataset`` understands (the part before ':')."""
    return list(_LOADERS)


def load_dataset(
    spec: str,
    *,
    split: str = "test",
    normalize_mean: Sequence[float] | None = None,
    normalize_std: Sequence[float] | None = None,
    download: bool = False,
    image_size: int | None = None,
    channels: int | None = None,
    num_classes: int | None = None,
) -> Dataset:
    """Open the dataset named by ``KIND:PATH`` (``digits`` needs no path).

    ``normalize_mean``/``normalize_std`` default to 0/1 (no normalisation); pass the teacher's.
    ``split`` is "train" or "test" ("val" means test, or an imagefolder's ``val`` subfolder).
    ``download`` fetches cifar10, cifar100 or fashion-mnist into PATH with torchvision.
    ``image_size``, ``channels``, ``num_classes``: what the model takes. Image folders are
    converted and resized to them (see :func:`imagefolder_transform`); any other dataset must
    already match, else a one-line :class:`ZsqError` says what differs.
    """
    kind, path = _parse_spec(spec)
    if split not in SPLITS:
        raise ZsqError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if download and kind not in DOWNLOADABLE:
        raise ConfigError(
            f"«download=True» fetches only {', '.join(DOWNLOADABLE)}; {kind} data must already be "
            "on disk, so drop «download=True»",
        )
    request = _Request(path, split, normalize_mean, normalize_std, download, image_size, channels)
    try:
        dataset = _LOADERS[kind](request)
        _check_fits_model(dataset, kind, image_size, num_classes)
    except _Mismatch as err:
        raise ConfigError(f"dataset {spec} ({split} split): {err.template}") from None
    logger.info("dataset %s (%s split): %d images", spec, split, len(dataset))
    return dataset


def load_dataset_for(
    spec: str,
    info: Mapping[str, Any],
    split: str = "test",
    *,
    download: bool = False,
    limit: int | None = None,
) -> Dataset:
    """:func:`load_dataset` in the input space that a run's or an export's model metadata
    describes (``image_shape``, ``num_classes``, ``normalize_mean``/``normalize_std``); with
    ``limit``, its first images only."""
    channels, size, _ = info["image_shape"]
    dataset = load_dataset(
        spec,
        split=split,
        normalize_mean=info.get("normalize_mean"),
        normalize_std=info.get("normalize_std"),
        download=download,
        channels=channels,
        image_size=size,
        num_classes=info["num_classes"],
    )
    return dataset if limit is None else head(dataset, limit)


def eval_transform(dataset: Dataset) -> str:
    """How ``dataset`` turns a stored image into the model's input (for reports)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return getattr(dataset, "eval_transform", "unknown (a dataset zsq did not build)")


def _check_fits_model(
    dataset: Dataset, kind: str, image_size: int | None, num_classes: int | None
) -> None:
    if len(dataset) == 0:
        raise _Mismatch("it holds no images; check the path, the split and the file's contents")
    if num_classes is not None:
        _check_labels(dataset, num_classes)
    if image_size is not None and kind != "imagefolder":
        _check_image_size(dataset, image_size)


def _check_labels(dataset: Dataset, num_classes: int) -> None:
    classes = getattr(dataset, "classes", None)  # an ImageFolder: labels follow its subfolders
    if classes is not None and len(classes) != num_classes:
        raise _Mismatch(
            f"it has {len(classes)} class subfolders but the model has {num_classes} classes; give "
            "one subfolder per class of the model, named so that they sort in its class order"
        )
    labels = np.asarray(getattr(dataset, "labels", getattr(dataset, "targets", [])))
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise _Mismatch(
            f"its labels run from {labels.min()} to {labels.max()} but the model has "
            f"{num_classes} classes (labels 0..{num_classes - 1}); use the data the model was "
            "trained for, or give the model's class count («num_classes»)"
        )


def _check_image_size(dataset: Dataset, image_size: int) -> None:
    height, width = dataset[0][0].shape[-2:]
    if (height, width) == (image_size, image_size):
        return
    fix = (
        f"pass «image_size=»{height} if the model takes {height}x{width} images"
        if height == width
        else f"resize the images to {image_size}x{image_size}"
    )
    raise _Mismatch(
        f"its images are {height}x{width} but the model's input is {image_size}x{image_size} "
        f"(«image_size», else the weights' sidecar, else the model's usual size); {fix}"
    )


def _parse_spec(spec: str) -> tuple[str, Path | None]:
    kind, _, rest = spec.strip().partition(":")
    kind = kind.lower()
    if kind not in _LOADERS:
        raise ZsqError(
            f"unknown dataset spec {spec!r}; use KIND:PATH with KIND one of "
            f"{', '.join(spec_kinds())} (e.g. cifar10:~/data/cifar, npz:test.npz, digits)"
        )
    if kind == "digits":
        return kind, None
    if not rest:
        raise ZsqError(f"dataset spec {spec!r} needs a path: write {kind}:PATH")
    return kind, Path(rest).expanduser()


def same_dataset(spec: str, other: str) -> bool:
    """Whether two dataset specs name the same data: the same kind and the same file or folder,
    however each path is spelt (relative, absolute, through a symlink, with ``~``)."""
    try:
        (kind, path), (other_kind, other_path) = _parse_spec(spec), _parse_spec(other)
    except ZsqError:
        return False
    if kind != other_kind or (path is None) != (other_path is None):
        return False
    return path is None or path.resolve() == other_path.resolve()


def _require_dir(path: Path, kind: str, hint: str = "") -> Path:
    if not path.is_dir():
        raise ConfigError(
            f"dataset folder {path} not found; give the folder holding the {kind} data"
            + (f" ({hint})" if hint else ""),
        )
    return path


# --- loaders ----------------------------------------------------------------------------------


def _load_cifar10(request: _Request) -> Dataset:
    return _load_torchvision_cifar("cifar10", request)


def _load_cifar100(request: _Request) -> Dataset:
    return _load_torchvision_cifar("cifar100", request)


def _load_torchvision_cifar(kind: str, request: _Request) -> Dataset:
    import torchvision

    root, download = request.path, request.download
    if root.name in ("cifar-10-batches-py", "cifar-100-python"):
        root = root.parent  # torchvision wants the folder *containing* the extracted batches
    if not root.is_dir() and not download:
        _require_dir(root, kind, "pass «download=True» to fetch it there")
    cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    if download:
        _fetch(kind, root, lambda: cls(root=str(root), train=request.train, download=True))
    try:
        raw = cls(root=str(root), train=request.train)
    except RuntimeError as exc:
        raise ConfigError(
            f"{kind} not found in {root} ({exc}); pass «download=True» to fetch it, or give the "
            "folder that contains the extracted python batches",
        ) from exc
    return ImageArrayDataset(raw.data, np.asarray(raw.targets), **request.norm)


def _load_cifar10_jpeg(request: _Request) -> Dataset:
    folder = _require_dir(request.path, "cifar10-jpeg", "expects train.npz and test.npz")
    file = folder / ("train.npz" if request.train else "test.npz")
    if not file.is_file():
        raise ZsqError(f"{file} not found; a cifar10-jpeg folder holds train.npz and test.npz")
    with np.load(file, allow_pickle=False) as arrays:
        _require_keys(arrays, ("jpeg", "offsets", "labels"), file)
        jpeg, offsets, labels = arrays["jpeg"], arrays["offsets"], arrays["labels"]
    return JpegArrayDataset(jpeg, offsets, labels, **request.norm)


def _load_npz(request: _Request) -> Dataset:
    """Arrays ``x`` (uint8 NHWC, or NHW for grayscale) and ``y``; the split is ignored."""
    path = request.path
    if not path.is_file():
        raise ZsqError(f"dataset file {path} not found; give an .npz with arrays x and y")
    fix = "save it with numpy.savez(path, x=images, y=labels)"
    try:
        arrays = np.load(path, allow_pickle=False)
        if not isinstance(arrays, np.lib.npyio.NpzFile):  # a .npy (one array) named .npz
            raise ZsqError(f"{path} holds one array, not an .npz of arrays x and y; {fix}")
        with arrays:
            _require_keys(arrays, ("x", "y"), path)
            images, labels = arrays["x"], arrays["y"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # truncated, pickled
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ZsqError(f"cannot read {path} as .npz ({reason}); {fix}") from None
    if labels.ndim != 1:
        raise ZsqError(f"{path}: y must be one class label per image, got shape {labels.shape}")
    if images.dtype != np.uint8:
        raise ZsqError(
            f"{path}: x must hold uint8 pixels (0-255), got {images.dtype}; convert with "
            "(x * 255).round().astype(numpy.uint8)"
        )
    if images.ndim not in (3, 4):
        raise ZsqError(f"{path}: x must be NHWC or NHW, got shape {images.shape}")
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[3] not in (1, 3):
        raise ZsqError(
            f"{path}: x of shape {images.shape} looks channels-first (NCHW); zsq reads NHWC: "
            "save numpy.transpose(x, (0, 2, 3, 1))"
        )
    if labels.dtype.kind not in "iu" and not (labels.dtype.kind == "f" and _whole(labels)):
        raise ZsqError(f"{path}: y must hold whole-number class labels, got {labels[:3]}...")
    return ImageArrayDataset(images, labels, **request.norm)


def _whole(values: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(values)) and np.all(values == np.round(values)))


def _require_keys(arrays, keys: Sequence[str], path: Path) -> None:
    missing = [k for k in keys if k not in arrays.files]
    if missing:
        raise ZsqError(
            f"{path} lacks arrays {missing} (has {arrays.files}); save it with {', '.join(keys)}"
        )


def _fetch(kind: str, root: Path, download: Callable[[], Any]) -> None:
    """torchvision's ``download``; if it fails, what it created under ``root`` is removed and
    the error is one line."""
    top = root  # the highest folder this download creates, if it creates root
    while not top.parent.exists():
        top = top.parent
    existed = root.exists()
    before = set(root.rglob("*")) if existed else set()
    try:
        download()
    except (OSError, RuntimeError) as exc:
        if not existed:
            shutil.rmtree(top, ignore_errors=True)
        else:
            for path in sorted(set(root.rglob("*")) - before, reverse=True):  # deepest first
                path.rmdir() if path.is_dir() else path.unlink()
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"cannot download {kind} into {root} ({reason}); check the network connection, or "
            "download the files by hand and give their folder without «download=True»",
        ) from exc


def _load_fashion_mnist(request: _Request) -> Dataset:
    if request.download:
        _download_fashion_mnist(request.path)
    folder = _require_dir(request.path, "fashion-mnist", "the four idx .gz files")
    folder = _find_idx_folder(folder)
    image_name, label_name = FASHION_FILES["train" if request.train else "test"]
    images = read_idx(_idx_file(folder, image_name))
    labels = read_idx(_idx_file(folder, label_name))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ZsqError(
            f"{folder}: {image_name} {images.shape} and {label_name} {labels.shape} do not form "
            "N images with N labels; re-download the files"
        )
    return ImageArrayDataset(images, labels, **request.norm)


def _download_fashion_mnist(root: Path) -> None:
    """torchvision's download: the idx files land in ``root/FashionMNIST/raw``."""
    import torchvision

    def download() -> None:
        for train in (False, True):
            torchvision.datasets.FashionMNIST(root=str(root), train=train, download=True)

    _fetch("fashion-mnist", root, download)


def _find_idx_folder(path: Path) -> Path:
    """Accept the folder of idx files or torchvision's ``root`` (``FashionMNIST/raw`` inside)."""
    for folder in (path, path / "raw", path / "FashionMNIST" / "raw"):
        if any((folder / f"{FASHION_FILES['test'][0]}{ext}").is_file() for ext in (".gz", "")):
            return folder
    return path


def _idx_file(folder: Path, name: str) -> Path:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    raise ZsqError(f"{folder / name}.gz not found; the fashion-mnist folder needs the idx files")


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (the MNIST format), gzip'ed or not: magic, dims (big-endian), bytes."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise ZsqError(f"cannot read {path} ({exc}); re-download the file") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ZsqError(f"{path} is not an unsigned-byte IDX file; re-download the file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    pixels = np.frombuffer(bytearray(data), dtype=np.uint8, offset=4 + 4 * ndim)  # writable
    if pixels.size != int(np.prod(dims)):
        raise ZsqError(f"{path} holds {pixels.size} bytes for shape {dims}; re-download the file")
    return pixels.reshape(dims)


def _load_digits(request: _Request) -> Dataset:
    """scikit-learn's bundled 8x8 digits (0..16 -> [0, 1]); a fixed seeded 1257/540 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.RandomState(0).permutation(len(digits.target))
    chosen = order[:DIGITS_TRAIN_SIZE] if request.train else order[DIGITS_TRAIN_SIZE:]
    images = (digits.images[chosen] / 16.0).astype(np.float32)
    return ImageArrayDataset(images, digits.target[chosen], **request.norm)


def imagefolder_transform(image_size: int) -> tuple[int, str]:
    """Shorter side to resize to, and the report's words, for a model taking ``image_size``.

    The 256 -> 224 resize and centre crop is ImageNet's evaluation convention and only meant for
    224-pixel models; any other size resizes the shorter side to the input size and crops the
    centre square (an image already at that size passes unchanged).
    """
    if image_size == IMAGENET_SIZE:
        return IMAGENET_RESIZE, (
            f"resize shorter side to {IMAGENET_RESIZE}, centre crop {IMAGENET_SIZE} "
            "(ImageNet convention), /255, normalised"
        )
    return image_size, (
        f"resize shorter side to {image_size}, centre crop {image_size}, /255, normalised"
    )


def _load_imagefolder(request: _Request) -> Dataset:
    """torchvision ImageFolder, converted to the model's channels and resized to its input."""
    from torchvision import datasets, transforms

    folder = _require_dir(request.path, "imagefolder", "one subfolder per class")
    root = _split_subfolder(folder, request.split)
    channels = 3 if request.channels is None else request.channels
    if channels not in (1, 3):
        raise _Mismatch(
            f"image folders give 1- (gray) or 3-channel (RGB) images but the model takes "
            f"{channels} channels; use an npz file of {channels}-channel images"
        )
    image_size = request.image_size or IMAGENET_SIZE
    resize, description = imagefolder_transform(image_size)
    mean = _per_channel(request.normalize_mean, 0.0, channels, "normalize_mean").flatten().tolist()
    std = _per_channel(request.normalize_std, 1.0, channels, "normalize_std").flatten().tolist()
    steps = [transforms.Grayscale(1)] if channels == 1 else []
    transform = transforms.Compose(
        [
            *steps,
            transforms.Resize(resize),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    try:
        dataset = datasets.ImageFolder(str(root), transform=transform, loader=_read_image)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ZsqError(
            f"no images found under {root} ({exc}); imagefolder needs DIR/<class>/<image> files"
        ) from exc
    dataset.eval_transform = ("gray, " if channels == 1 else "") + description
    return dataset


def _read_image(path: str) -> Any:
    """An image file as RGB, or a one-line error naming the file that PIL cannot read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as file, Image.open(file) as img:
            return img.convert("RGB")
    except Image.DecompressionBombError as err:  # PIL's guard against huge images
        raise ZsqError(
            f"image {path} is too large to read safely ({str(err).split('.')[0]}); shrink or "
            "remove it"
        ) from None
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ZsqError(f"cannot read image {path} ({err}); fix or remove the file") from None


def _split_subfolder(path: Path, split: str) -> Path:
    """Use ``DIR/<split>`` (``val`` also for test) when present, else ``DIR`` itself."""
    names = [split] + (["val", "test"] if split in ("test", "val") else [])
    for name in names:
        if (path / name).is_dir():
            logger.info("imagefolder: using %s for the %s split", path / name, split)
            return path / name
    return path


_LOADERS: dict[str, Callable[[_Request], Dataset]] = {
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "cifar10-jpeg": _load_cifar10_jpeg,
    "npz": _load_npz,
    "fashion-mnist": _load_fashion_mnist,
    "imagefolder": _load_imagefolder,
    "digits": _load_digits,
}


# --- subsets ----------------------------------------------------------------------------------


def subset(dataset: Dataset, n: int, seed: int = 0) -> Dataset:
    """A deterministic random ``n``-item subset (e.g. 512 calibration images of a training set).

    Only the chosen items are ever read, so lazily decoded datasets stay cheap.
    """
    size = len(dataset)
    if n < 1:
        raise ZsqError(f"subset size must be >= 1, got {n}")
    if n >= size:
        if n > size:
            logger.warning("asked for %d items of a %d-item dataset: using all of it", n, size)
        return dataset
    indices = np.random.default_rng(seed).permutation(size)[:n]
    return Subset(dataset, indices.tolist())


def head(dataset: Dataset, n: int) -> Dataset:
    """The first ``n`` items, in order (e.g. a quick evaluation on part of a test set)."""
    if n < 1:
        raise ZsqError(f"number of items must be >= 1, got {n}")
    return dataset if n >= len(dataset) else Subset(dataset, range(n))
