"""Dataset specs: parsers on tiny synthetic files, then the shared real data when present."""

import gzip
import io
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zsq.data import (
    DOWNLOADABLE,
    eval_transform,
    head,
    load_dataset,
    read_idx,
    spec_kinds,
    subset,
)
from zsq.errors import ZsqError
from zsq.paths import shared_data_dir

SHARED = shared_data_dir()


def shared_path(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"shared data {path} not found (set ZSQ_SHARED_DATA)")
    return path


def test_spec_kinds():
    assert set(spec_kinds()) == {
        "cifar10",
        "cifar100",
        "cifar10-jpeg",
        "npz",
        "fashion-mnist",
        "imagefolder",
        "digits",
    }


def test_unknown_scheme_lists_kinds():
    with pytest.raises(ZsqError) as info:
        load_dataset("mnist:/data")
    assert all(kind in str(info.value) for kind in spec_kinds())


@pytest.mark.parametrize(
    "kind", ["cifar10", "cifar100", "cifar10-jpeg", "fashion-mnist", "imagefolder", "npz"]
)
def test_missing_path_says_not_found(tmp_path, kind):
    with pytest.raises(ZsqError, match="not found"):
        load_dataset(f"{kind}:{tmp_path / 'absent'}")


def test_spec_without_path():
    with pytest.raises(ZsqError, match="needs a path"):
        load_dataset("npz")


def test_unknown_split():
    with pytest.raises(ZsqError, match="split"):
        load_dataset("digits", split="dev")


def test_cifar10_empty_folder_suggests_download(tmp_path):
    with pytest.raises(ZsqError, match="download=True"):
        load_dataset(f"cifar10:{tmp_path}")


# --- npz ------------------------------------------------------------------------------------------


def test_npz_rgb_pipeline(tmp_path):
    x = np.zeros((4, 5, 6, 3), dtype=np.uint8)
    x[1, :, :, 0] = 255
    np.savez(tmp_path / "d.npz", x=x, y=np.array([3, 1, 4, 1]))
    ds = load_dataset(
        f"npz:{tmp_path / 'd.npz'}", normalize_mean=(0.5, 0.0, 0.0), normalize_std=(0.25, 1.0, 1.0)
    )
    assert len(ds) == 4
    image, label = ds[1]
    assert image.shape == (3, 5, 6) and image.dtype == torch.float32 and label == 1
    assert isinstance(label, int)
    assert torch.allclose(image[0], torch.full((5, 6), 2.0))  # (1 - 0.5) / 0.25
    assert torch.allclose(ds[0][0][0], torch.full((5, 6), -2.0))
    assert image[1:].abs().sum() == 0


def test_npz_grayscale_and_defaults(tmp_path):
    x = np.full((2, 3, 3), 51, dtype=np.uint8)
    np.savez(tmp_path / "g.npz", x=x, y=np.array([0, 1]))
    image, _ = load_dataset(f"npz:{tmp_path / 'g.npz'}")[0]
    assert image.shape == (1, 3, 3)
    assert torch.allclose(image, torch.full((1, 3, 3), 0.2))


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "f.npz", x=np.zeros((2, 3, 3), np.float32), y=np.zeros(2))
    with pytest.raises(ZsqError, match="uint8"):
        load_dataset(f"npz:{tmp_path / 'f.npz'}")
    np.savez(tmp_path / "k.npz", images=np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ZsqError, match="lacks arrays"):
        load_dataset(f"npz:{tmp_path / 'k.npz'}")
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 3, 8, 8), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(ZsqError, match=r"channels-first \(NCHW\).*transpose"):
        load_dataset(f"npz:{tmp_path / 'c.npz'}")
    np.savez(tmp_path / "y.npz", x=np.zeros((2, 8, 8, 3), np.uint8), y=np.array([0.5, 1.0]))
    with pytest.raises(ZsqError, match="whole-number class labels"):
        load_dataset(f"npz:{tmp_path / 'y.npz'}")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ZsqError, match="bad.npz"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")


def test_normalisation_length_must_match_channels(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((1, 2, 2, 3), np.uint8), y=np.zeros(1))
    with pytest.raises(ZsqError, match="channels"):
        load_dataset(f"npz:{tmp_path / 'd.npz'}", normalize_mean=(0.1, 0.2))
    with pytest.raises(ZsqError, match="positive"):
        load_dataset(f"npz:{tmp_path / 'd.npz'}", normalize_std=(0.0,))


# --- cifar10-jpeg ---------------------------------------------------------------------------------


def _write_jpeg_npz(path: Path, colours: list[tuple[int, int, int]]) -> None:
    blobs = []
    for colour in colours:
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(buffer, format="JPEG", quality=95)
        blobs.append(np.frombuffer(buffer.getvalue(), np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    labels = np.arange(len(colours), dtype=np.int64)
    np.savez(path, jpeg=np.concatenate(blobs), offsets=offsets, labels=labels)


def test_cifar10_jpeg_synthetic(tmp_path):
    _write_jpeg_npz(tmp_path / "test.npz", [(255, 0, 0), (0, 0, 255)])
    _write_jpeg_npz(tmp_path / "train.npz", [(0, 255, 0)] * 3)
    test = load_dataset(f"cifar10-jpeg:{tmp_path}")
    train = load_dataset(f"cifar10-jpeg:{tmp_path}", split="train")
    assert len(test) == 2 and len(train) == 3
    image, label = test[1]
    assert image.shape == (3, 32, 32) and label == 1
    assert image[2].mean() > 0.95 and image[0].mean() < 0.05  # blue, JPEG-approximately


def test_cifar10_jpeg_missing_split_file(tmp_path):
    _write_jpeg_npz(tmp_path / "test.npz", [(0, 0, 0)])
    with pytest.raises(ZsqError, match="train.npz"):
        load_dataset(f"cifar10-jpeg:{tmp_path}", split="train")


def test_jpeg_subset_decodes_only_the_chosen_images(tmp_path):
    _write_jpeg_npz(tmp_path / "train.npz", [(i, i, i) for i in range(0, 200, 2)])
    train = load_dataset(f"cifar10-jpeg:{tmp_path}", split="train")
    chosen = subset(train, 8, seed=1)
    _ = [chosen[i] for i in range(len(chosen))]
    assert len(train._cache) == 8


def test_shared_cifar10_jpeg_matches_exact_test_images():
    exact = np.load(shared_path("cifar10-exact/test_first846.npz"))
    ds = load_dataset(f"cifar10-jpeg:{shared_path('cifar10-jpeg')}")
    assert len(ds) == 10_000
    assert np.array_equal(ds.labels[:846], exact["y"])
    decoded = torch.stack([ds[i][0] for i in range(20)])
    reference = torch.from_numpy(exact["x"][:20]).permute(0, 3, 1, 2).float() / 255
    assert decoded.shape == (20, 3, 32, 32)
    assert (decoded - reference).abs().mean() < 10 / 255  # lossy copy: ~5.8/255 on average


# --- fashion-mnist (idx.gz) -----------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(folder: Path, n_train: int = 3, n_test: int = 2) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, array in arrays.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(_idx_bytes(array)))
    return arrays


def test_fashion_mnist_synthetic(tmp_path):
    arrays = _write_fashion(tmp_path)
    test = load_dataset(f"fashion-mnist:{tmp_path}", normalize_mean=(0.5,), normalize_std=(0.5,))
    train = load_dataset(f"fashion-mnist:{tmp_path}", split="train")
    assert len(test) == 2 and len(train) == 3
    image, label = test[1]
    assert image.shape == (1, 28, 28) and label == arrays["t10k-labels-idx1-ubyte"][1]
    expected = (arrays["t10k-images-idx3-ubyte"][1] / 255 - 0.5) / 0.5
    assert torch.allclose(image[0], torch.from_numpy(expected).float(), atol=1e-6)


def test_fashion_mnist_torchvision_layout(tmp_path):
    _write_fashion(tmp_path / "FashionMNIST" / "raw")
    assert len(load_dataset(f"fashion-mnist:{tmp_path}")) == 2


def test_read_idx_rejects_garbage(tmp_path):
    (tmp_path / "x.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04garbage"))
    with pytest.raises(ZsqError, match="IDX"):
        read_idx(tmp_path / "x.gz")
    (tmp_path / "y.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ZsqError, match="y.gz"):
        read_idx(tmp_path / "y.gz")
    truncated = _idx_bytes(np.zeros((2, 3, 3)))[:-4]
    (tmp_path / "z").write_bytes(truncated)
    with pytest.raises(ZsqError, match="re-download"):
        read_idx(tmp_path / "z")


def test_shared_fashion_mnist():
    folder = shared_path("fashion-mnist")
    test = load_dataset(f"fashion-mnist:{folder}", normalize_mean=(0.286,), normalize_std=(0.353,))
    assert len(test) == 10_000
    image, label = test[0]
    assert image.shape == (1, 28, 28) and 0 <= label < 10
    raw = read_idx(folder / "t10k-images-idx3-ubyte.gz")[0]
    assert torch.allclose(image[0], (torch.from_numpy(raw).float() / 255 - 0.286) / 0.353)


# --- imagefolder ----------------------------------------------------------------------------------


def _write_imagefolder(root: Path) -> None:
    for cls, colour in [("cat", (255, 0, 0)), ("dog", (0, 255, 0))]:
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 30), colour).save(root / cls / f"{i}.png")


def test_imagefolder(tmp_path):
    _write_imagefolder(tmp_path)
    ds = load_dataset(
        f"imagefolder:{tmp_path}", image_size=16, normalize_mean=(0.5,), normalize_std=(0.5,)
    )
    assert len(ds) == 4
    image, label = ds[2]
    assert image.shape == (3, 16, 16) and label == 1
    assert torch.allclose(image[1], torch.ones(16, 16))  # green: (1 - 0.5) / 0.5
    assert torch.allclose(image[0], -torch.ones(16, 16))


def test_imagefolder_with_an_unreadable_image_names_it(tmp_path):
    _write_imagefolder(tmp_path)
    broken = tmp_path / "dog" / "2.jpg"
    broken.write_bytes(b"not an image")
    ds = load_dataset(f"imagefolder:{tmp_path}", image_size=8)
    assert ds[0][0].shape == (3, 8, 8)
    with pytest.raises(ZsqError, match=r"cannot read image .*2\.jpg.*fix or remove"):
        ds[4]


def test_imagefolder_uses_split_subfolder(tmp_path):
    _write_imagefolder(tmp_path / "val")
    (tmp_path / "train").mkdir()
    assert len(load_dataset(f"imagefolder:{tmp_path}", image_size=8)) == 4


def test_imagefolder_without_images(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(ZsqError, match="no images"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_imagefolder_at_224_uses_the_imagenet_resize_and_crop(tmp_path):
    (tmp_path / "a").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a" / "0.png")
    ds = load_dataset(f"imagefolder:{tmp_path}", image_size=224)
    assert ds[0][0].shape == (3, 224, 224)
    assert "256" in eval_transform(ds) and "ImageNet" in eval_transform(ds)
    # independently: shorter side 300 -> 256 (width 400 -> 341), then the centre 224 x 224
    resized = np.asarray(Image.fromarray(pixels).resize((341, 256), Image.BILINEAR))
    top, left = (256 - 224) // 2, (341 - 224) // 2
    crop = torch.from_numpy(resized[top : top + 224, left : left + 224].copy())
    expected = crop.permute(2, 0, 1).float() / 255
    assert (ds[0][0] - expected).abs().max() < 0.02  # PIL vs torchvision antialias rounding


def test_imagefolder_at_the_model_size_keeps_the_pixels(tmp_path):
    """A 32-px model sees a 32x32 PNG exactly as the same pixels in an npz (no 224 detour)."""
    pixels = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        (tmp_path / "folder" / f"c{i}").mkdir(parents=True)
        Image.fromarray(image).save(tmp_path / "folder" / f"c{i}" / "0.png")
    np.savez(tmp_path / "same.npz", x=pixels, y=np.arange(2))
    norm = {"normalize_mean": (0.4, 0.5, 0.6), "normalize_std": (0.2, 0.25, 0.3)}
    folder = load_dataset(f"imagefolder:{tmp_path / 'folder'}", image_size=32, **norm)
    arrays = load_dataset(f"npz:{tmp_path / 'same.npz'}", image_size=32, **norm)
    for i in range(2):
        assert torch.allclose(folder[i][0], arrays[i][0], atol=1e-6) and folder[i][1] == i
    assert eval_transform(folder).startswith("resize shorter side to 32, centre crop 32")
    assert eval_transform(arrays).startswith("none")


def test_imagefolder_gray_for_a_one_channel_model(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8), (255, 255, 255)).save(tmp_path / "a" / "0.png")
    ds = load_dataset(f"imagefolder:{tmp_path}", image_size=8, channels=1)
    assert ds[0][0].shape == (1, 8, 8) and torch.allclose(ds[0][0], torch.ones(1, 8, 8))
    with pytest.raises(ZsqError, match="1- .*or 3-channel"):
        load_dataset(f"imagefolder:{tmp_path}", image_size=8, channels=4)


def test_data_must_fit_the_model(tmp_path):
    """Channels, labels, class folders, size and emptiness are checked when the model is known."""
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 8, 8, 3), np.uint8), y=np.array([0, 1, 9]))
    spec = f"npz:{tmp_path / 'd.npz'}"
    assert len(load_dataset(spec, channels=3, image_size=8, num_classes=10)) == 3
    with pytest.raises(ZsqError, match="3 channel.*takes 1"):
        load_dataset(spec, channels=1)
    with pytest.raises(ZsqError, match="labels run from 0 to 9 .* 5 classes"):
        load_dataset(spec, num_classes=5)
    with pytest.raises(ZsqError, match="8x8 .* 32x32 .*image_size=8"):
        load_dataset(spec, image_size=32)
    np.savez(tmp_path / "e.npz", x=np.zeros((0, 8, 8, 3), np.uint8), y=np.zeros(0))
    with pytest.raises(ZsqError, match="no images"):
        load_dataset(f"npz:{tmp_path / 'e.npz'}")
    _write_imagefolder(tmp_path / "folder")  # 2 classes
    with pytest.raises(ZsqError, match="2 class subfolders .* 10 classes"):
        load_dataset(f"imagefolder:{tmp_path / 'folder'}", num_classes=10)


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_download_leaves_no_folders_behind(tmp_path, monkeypatch, existing):
    """torchvision makes its folders, then the network fails: one line, and only what was
    there before stays."""
    import urllib.error

    import torchvision

    def unreachable(self):
        Path(self.raw_folder).mkdir(parents=True, exist_ok=True)
        raise urllib.error.URLError("no route to host\nsecond line")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", unreachable)
    root = tmp_path / "data" / "fm"
    if existing:
        root.mkdir(parents=True)
        (root / "mine.txt").write_text("x")
    with pytest.raises(ZsqError, match="cannot download fashion-mnist") as info:
        load_dataset(f"fashion-mnist:{root}", download=True)
    assert "\n" not in str(info.value)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == (["data", "data/fm", "data/fm/mine.txt"] if existing else [])


def test_download_only_for_kinds_torchvision_fetches(tmp_path):
    with pytest.raises(ZsqError, match="download=True"):
        load_dataset(f"npz:{tmp_path / 'x.npz'}", download=True)
    assert set(DOWNLOADABLE) == {"cifar10", "cifar100", "fashion-mnist"}


# --- digits ---------------------------------------------------------------------------------------


def test_digits_split_sizes_and_range():
    train = load_dataset("digits", split="train")
    test = load_dataset("digits")
    assert len(train) == 1257 and len(test) == 540
    image, label = test[0]
    assert image.shape == (1, 8, 8) and 0 <= label < 10
    pixels = torch.stack([train[i][0] for i in range(len(train))])
    assert pixels.min() == 0 and pixels.max() == 1


def test_digits_split_is_deterministic_and_disjoint():
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits", split="train"), load_dataset("digits")
    again = load_dataset("digits")
    assert np.array_equal(test.images, again.images)
    everything = np.concatenate([train.images, test.images]).reshape(1797, -1)
    full = (load_digits().images / 16).reshape(1797, -1)
    assert np.allclose(np.sort(everything.sum(1)), np.sort(full.sum(1)))


# --- subset / head --------------------------------------------------------------------------------


def test_subset_is_deterministic_and_seeded():
    ds = load_dataset("digits", split="train")
    a, b, c = subset(ds, 512, seed=0), subset(ds, 512, seed=0), subset(ds, 512, seed=1)
    assert len(a) == 512 and a.indices == b.indices and a.indices != c.indices
    assert len(set(a.indices)) == 512


def test_subset_edge_cases():
    ds = load_dataset("digits")
    assert subset(ds, 10_000, seed=0) is ds
    with pytest.raises(ZsqError):
        subset(ds, 0, seed=0)


def test_head():
    ds = load_dataset("digits")
    first = head(ds, 3)
    assert len(first) == 3 and torch.equal(first[2][0], ds[2][0])
    assert head(ds, 10_000) is ds


def _bad_npz_files(folder):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (10, 8, 8, 3), np.uint8)
    np.savez(folder / "labels2.npz", x=x, y=np.zeros((10, 2), np.int64))
    np.save(folder / "one.npy", x)
    (folder / "one.npy").rename(folder / "one.npz")
    np.savez(folder / "obj.npz", x=np.array([x, 1], dtype=object), y=np.arange(10))
    np.savez(folder / "full.npz", x=x, y=np.arange(10))
    whole = (folder / "full.npz").read_bytes()
    (folder / "trunc.npz").write_bytes(whole[: len(whole) // 2])
    return {
        "labels2.npz": "y must be one class label per image, got shape (10, 2)",
        "one.npz": "holds one array, not an .npz",
        "obj.npz": "Object arrays cannot be loaded",
        "trunc.npz": "cannot read",
    }


def test_broken_npz_files_are_one_line_errors(tmp_path):
    for name, message in _bad_npz_files(tmp_path).items():
        with pytest.raises(ZsqError, match=re.escape(message)):
            load_dataset(f"npz:{tmp_path / name}", split="test")


def test_a_decompression_bomb_in_an_image_folder_is_a_one_line_error(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.new("L", (15000, 15000)).save(tmp_path / "a" / "big.png")
    dataset = load_dataset(f"imagefolder:{tmp_path}", split="test", image_size=8)
    with pytest.raises(ZsqError, match="too large to read safely"):
        dataset[0]
