"""Data readers, probe stimuli and the bundled sample, tested on files written here."""
from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from netanatomy.data import (ImageDataset, colour_and_grey, gratings, luminance, make_loader, open_dataset,
                             parse_spec, to_grey)
from netanatomy.data import bundled, idx, photos, spec
from netanatomy.data.cifar import safe_load_pickle
from netanatomy.errors import UsageError

FASHION_DIR = spec.DEFAULT_FASHION_MNIST_DIR
needs_fashion = pytest.mark.skipif(idx.find_idx_pair(FASHION_DIR, "train") is None,
                                   reason=f"Debian's dataset-fashion-mnist is not installed in {FASHION_DIR}")


# -- IDX ---------------------------------------------------------------------------------------

def _planted_idx(n: int = 12, h: int = 5, w: int = 7) -> tuple[np.ndarray, np.ndarray]:
    images = (np.arange(n * h * w) % 251).astype(np.uint8).reshape(n, h, w)
    labels = (np.arange(n) % 3).astype(np.uint8)
    return images, labels


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip_gzipped_or_not(tmp_path, suffix):
    images, _ = _planted_idx()
    path = idx.write_idx(tmp_path / f"a-idx3-ubyte{suffix}", images)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    back = idx.read_idx(path)
    assert back.dtype == np.uint8 and back.shape == images.shape
    np.testing.assert_array_equal(back, images)
    for dtype in (np.int32, np.float32, np.float64, np.int16):
        values = np.arange(24, dtype=dtype).reshape(2, 3, 4) - 5
        np.testing.assert_array_equal(idx.read_idx(idx.write_idx(tmp_path / f"v{suffix}", values)), values)


def test_idx_header_is_standard(tmp_path):
    path = idx.write_idx(tmp_path / "x", np.zeros((2, 3, 4), dtype=np.uint8))
    raw = path.read_bytes()
    assert raw[:4] == bytes([0, 0, 0x08, 3])
    assert raw[4:16] == bytes([0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4]) and len(raw) == 16 + 24


def test_idx_rejects_bad_and_truncated_files(tmp_path):
    good = idx.idx_bytes(np.ones((3, 4, 4), dtype=np.uint8))
    cases = {
        "magic": b"\x08\x03" + good[2:],
        "type": good[:2] + b"\x07" + good[3:],
        "short": good[:-5],
        "long": good + b"\x00",
        "header": good[:9],
        "tiny": b"\x00\x00",
    }
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(UsageError, match="IDX|truncated|longer"):
            idx.read_idx(tmp_path / name)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(good)[:-12])
    with pytest.raises(UsageError, match="gzip"):
        idx.read_idx(tmp_path / "bad.gz")
    with pytest.raises(UsageError, match="magic"):
        idx.read_idx(tmp_path / "magic")
    with pytest.raises(UsageError, match="truncated"):
        idx.read_idx(tmp_path / "short")


def _write_idx_folder(folder: Path, prefix: str = "", gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = _planted_idx()
    ext = ".gz" if gz else ""
    for head, sl in (("train", slice(0, 8)), ("t10k", slice(8, 12))):
        idx.write_idx(folder / f"{prefix}{head}-images-idx3-ubyte{ext}", images[sl])
        idx.write_idx(folder / f"{prefix}{head}-labels-idx1-ubyte{ext}", labels[sl])
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_reader(tmp_path, gz):
    images, labels = _write_idx_folder(tmp_path / "d", gz=gz)
    train = open_dataset(f"mnist:{tmp_path / 'd'}", "train")
    test = open_dataset(f"idx:{tmp_path / 'd'}", "test")
    assert len(train) == 8 and len(test) == 4 and train.image_shape == (1, 5, 7)
    assert train.classes == [str(i) for i in range(10)] and test.classes == ["0", "1", "2"]
    x, y = train.tensors()
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    np.testing.assert_allclose(x[:, 0].numpy(), images[:8] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(y.numpy(), labels[:8])
    np.testing.assert_array_equal(test.targets, labels[8:])


def test_idx_folder_mismatched_counts(tmp_path):
    _write_idx_folder(tmp_path)
    idx.write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3, dtype=np.uint8))
    with pytest.raises(UsageError, match="4 images but .* 3 labels"):
        open_dataset(f"idx:{tmp_path}", "test")


# -- Fashion-MNIST: Debian's files and the bundled sample ---------------------------------------

@pytest.mark.needs_fashion_mnist
@needs_fashion
def test_debian_fashion_mnist():
    train, test = open_dataset("fashion-mnist", "train"), open_dataset("fashion-mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.image_shape == test.image_shape == (1, 28, 28)
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    for ds in (train, test):
        assert set(np.unique(ds.targets)) == set(range(10))
    x, y = test[[0, 1]]
    assert x.shape == (2, 1, 28, 28) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


@pytest.mark.needs_fashion_mnist
@needs_fashion
def test_bundled_sample_is_the_documented_subset_of_debian_files():
    """The shipped bytes follow the documented rule: regenerating them from Debian's files agrees."""
    for split in ("train", "test"):
        full_images, full_labels = idx.read_idx_split(FASHION_DIR, split)
        chosen = bundled.stratified_indices(full_labels, bundled.PER_CLASS, split)
        sample = open_dataset("bundled", split)
        np.testing.assert_array_equal(sample.source.images, full_images[chosen])
        np.testing.assert_array_equal(sample.targets, full_labels[chosen])


def test_bundled_sample_needs_no_debian_files(tmp_path, monkeypatch):
    monkeypatch.setattr(spec, "DEFAULT_FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(UsageError, match="dataset-fashion-mnist"):
        open_dataset("fashion-mnist", "train")
    for split in ("train", "test"):
        ds = open_dataset("bundled", split)
        assert open_dataset("bundled:fashion-mnist", split).spec == "bundled:fashion-mnist"
        assert len(ds) == 2000 and ds.image_shape == (1, 28, 28) and ds.num_classes == 10
        assert np.bincount(ds.targets, minlength=10).tolist() == [200] * 10
        assert ds.targets[:10].tolist() == list(range(10))  # interleaved: every prefix is balanced
        assert np.bincount(open_dataset("bundled", split, limit=100).targets).tolist() == [10] * 10
        x, _ = ds.tensors()
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0 and float(x.mean()) > 0.1
    size = sum((bundled.RESOURCE_DIR / name).stat().st_size for name in bundled.sample_file_names())
    assert size < 2_100_000
    assert "Zalando SE" in (bundled.RESOURCE_DIR / "LICENSE-fashion-mnist.txt").read_text()
    with pytest.raises(UsageError, match="bundled sample"):
        open_dataset("bundled:cifar10")


def test_stratified_indices_are_balanced_deterministic_interleaved():
    labels = np.repeat(np.arange(4), [30, 50, 20, 40])
    np.random.default_rng(0).shuffle(labels)
    chosen = bundled.stratified_indices(labels, 10, "train")
    assert chosen.size == 40 and np.unique(chosen).size == 40
    assert labels[chosen].tolist() == list(range(4)) * 10
    np.testing.assert_array_equal(chosen, bundled.stratified_indices(labels, 10, "train"))
    assert not np.array_equal(chosen, bundled.stratified_indices(labels, 10, "test"))
    with pytest.raises(ValueError):
        bundled.stratified_indices(labels, 21, "train")


# -- CIFAR -------------------------------------------------------------------------------------

def _cifar_rows(n: int, start: int) -> np.ndarray:
    """Row i: red plane all (start+i) % 256, green 2(start+i), blue a left-right ramp."""
    rows = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    k = (start + np.arange(n)) % 256
    rows[:, 0] = k[:, None, None]
    rows[:, 1] = (2 * k % 256)[:, None, None]
    rows[:, 2] = np.arange(32, dtype=np.uint8)[None, None, :] * 8
    return rows.reshape(n, 3072)


def _dump(path: Path, obj, protocol: int) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 byte strings, as in the official CIFAR files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        head = pickle.SHORT_BINSTRING + bytes([len(raw)]) if len(raw) < 256 else \
            pickle.BINSTRING + struct.pack("<i", len(raw))
        self.write(head + raw)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def _dump_py2(path: Path, obj) -> None:
    """A protocol-2 pickle as Python 2 with NumPy 1 wrote it (numpy.core names, byte strings)."""
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    path.write_bytes(buffer.getvalue().replace(b"numpy._core.", b"numpy.core."))


def _write_cifar10(folder: Path, n: int = 6) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for b in range(1, 6):  # as the official files: Python 2, protocol 2
        batch = {"batch_label": "training batch", "labels": [int(v) for v in (np.arange(n) + b) % 10],
                 "data": _cifar_rows(n, 100 * b), "filenames": ["x.png"] * n}
        _dump_py2(folder / f"data_batch_{b}", batch)
    # as if re-saved by Python 3: str keys, protocol 5 (arrays via _frombuffer); the meta with
    # protocol 2 from Python 3 (bytes via _codecs.encode)
    _dump(folder / "test_batch", {"labels": list(range(n)), "data": _cifar_rows(n, 0)}, protocol=5)
    _dump(folder / "batches.meta", {b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog",
                                                     b"frog", b"horse", b"ship", b"truck"]}, protocol=2)


def test_cifar10_synthetic(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    _write_cifar10(root)
    train = open_dataset(f"cifar10:{root}", "train")
    test = open_dataset(f"cifar10:{tmp_path}", "test")  # the parent folder is found too
    assert len(train) == 30 and len(test) == 6 and train.image_shape == (3, 32, 32)
    assert train.classes[0] == "airplane" and train.classes[-1] == "truck"
    np.testing.assert_array_equal(train.targets[:6], (np.arange(6) + 1) % 10)
    x, y = test.tensors()
    assert y.tolist() == list(range(6))
    np.testing.assert_allclose(x[:, 0, 5, 7].numpy(), np.arange(6) / 255.0, atol=1e-7)
    np.testing.assert_allclose(x[:, 1, 0, 0].numpy(), 2 * np.arange(6) / 255.0, atol=1e-7)
    np.testing.assert_allclose(x[3, 2, 11].numpy(), np.arange(32) * 8 / 255.0, atol=1e-7)  # rows are H, W


def test_cifar100_synthetic_fine_and_coarse(tmp_path):
    n = 8
    for name in ("train", "test"):
        _dump(tmp_path / name, {b"fine_labels": list(range(n)), b"coarse_labels": [i // 4 for i in range(n)],
                                b"data": _cifar_rows(n, 3)}, protocol=2)
    _dump(tmp_path / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                              b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}, protocol=2)
    fine = open_dataset(f"cifar100:{tmp_path}", "train")
    coarse = open_dataset(f"cifar100:{tmp_path}?labels=coarse", "test")
    assert fine.num_classes == 100 and coarse.num_classes == 20
    assert fine.targets.tolist() == list(range(n)) and coarse.targets.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        import builtins
        return (builtins.eval, ("1+1",))


def test_malicious_pickles_are_refused_without_running(tmp_path):
    root = tmp_path / "c"
    _write_cifar10(root)
    marker = tmp_path / "pwned"
    _dump(root / "test_batch", {b"data": _Evil(marker), b"labels": [0]}, protocol=2)
    with pytest.raises(UsageError, match="refusing to load .*system"):
        open_dataset(f"cifar10:{root}", "test")
    assert not marker.exists()
    _dump(root / "test_batch", [_EvalEvil()], protocol=4)
    with pytest.raises(UsageError, match="refusing to load builtins.eval"):
        open_dataset(f"cifar10:{root}", "test")
    _dump(root / "test_batch", {b"data": np.array([1, "a"], dtype=object), b"labels": [0]}, protocol=2)
    with pytest.raises(UsageError, match="object"):
        open_dataset(f"cifar10:{root}", "test")
    (root / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(UsageError):
        open_dataset(f"cifar10:{root}", "test")
    _dump(root / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2)
    with pytest.raises(UsageError, match="3072"):
        open_dataset(f"cifar10:{root}", "test")


def test_safe_unpickler_accepts_plain_data(tmp_path):
    value = {"a": [1, 2.5, "s", b"b", None, True], "arr": np.arange(6, dtype=np.int64).reshape(2, 3),
             "scalar": np.float32(1.5)}
    for protocol in (2, 4, 5):
        _dump(tmp_path / "p", value, protocol)
        back = safe_load_pickle(tmp_path / "p")
        np.testing.assert_array_equal(back["arr"], value["arr"])
        assert back["a"] == value["a"] and back["scalar"] == np.float32(1.5)


# -- image folders -------------------------------------------------------------------------------

def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _solid(h: int, w: int, rgb) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, dtype=np.uint8), (h, w, 3)).copy()


def test_folder_reader_classes_resize_and_crop(tmp_path):
    _png(tmp_path / "b_blue" / "1.png", _solid(20, 30, (0, 0, 255)))
    _png(tmp_path / "a_red" / "x.png", _solid(24, 24, (255, 0, 0)))
    _png(tmp_path / "a_red" / "sub" / "y.jpeg", _solid(24, 24, (255, 0, 0)))
    halves = np.concatenate([_solid(20, 20, (255, 0, 0)), _solid(20, 20, (0, 0, 255))], axis=1)  # 20 x 40
    _png(tmp_path / "c_split" / "h.png", halves)
    _png(tmp_path / "d_grey" / "g.png", np.full((16, 16), 128, dtype=np.uint8))
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "a_red" / "notes.txt").write_text("not an image")
    ds = open_dataset(f"folder:{tmp_path}?size=16")
    assert ds.classes == ["a_red", "b_blue", "c_split", "d_grey"] and ds.image_shape == (3, 16, 16)
    assert ds.targets.tolist() == [0, 0, 1, 2, 3]
    x, _ = ds.tensors()
    assert torch.allclose(x[0, 0], torch.ones(16, 16)) and float(x[0, 1:].abs().max()) == 0.0
    assert torch.allclose(x[2, 2], torch.ones(16, 16)) and float(x[2, :2].max()) == 0.0
    # 20 x 40 -> 16 x 32 -> centre 16 x 16 = columns 8..23: red on the left, blue on the right
    assert float(x[3, 0, :, :6].min()) > 0.95 and float(x[3, 2, :, :6].max()) < 0.05
    assert float(x[3, 2, :, 10:].min()) > 0.95 and float(x[3, 0, :, 10:].max()) < 0.05
    assert torch.equal(x[4, 0], x[4, 1]) and torch.equal(x[4, 1], x[4, 2])  # grey image -> equal RGB
    crop = open_dataset(f"folder:{tmp_path}?size=16&resize=32")  # resize 32, crop 16
    assert crop.image_shape == (3, 16, 16)
    with pytest.raises(UsageError, match="resize"):
        open_dataset(f"folder:{tmp_path}?size=16&resize=8")


def test_folder_reader_flat_splits_and_errors(tmp_path):
    _png(tmp_path / "flat" / "1.png", _solid(8, 8, (10, 20, 30)))
    _png(tmp_path / "flat" / "2.png", _solid(8, 8, (10, 20, 30)))
    flat = open_dataset(f"folder:{tmp_path / 'flat'}?size=8")
    assert flat.classes is None and flat.targets.tolist() == [-1, -1]
    assert flat[0][1].item() == -1
    _png(tmp_path / "split" / "train" / "cat" / "1.png", _solid(8, 8, (1, 2, 3)))
    _png(tmp_path / "split" / "train" / "dog" / "1.png", _solid(8, 8, (1, 2, 3)))
    _png(tmp_path / "split" / "val" / "cat" / "1.png", _solid(8, 8, (1, 2, 3)))
    assert len(open_dataset(f"folder:{tmp_path / 'split'}?size=8", "train")) == 2
    assert len(open_dataset(f"folder:{tmp_path / 'split'}?size=8", "test")) == 1
    with pytest.raises(UsageError, match="no folder"):
        open_dataset(f"folder:{tmp_path / 'nothing'}")
    (tmp_path / "none").mkdir()
    with pytest.raises(UsageError, match="no images"):
        open_dataset(f"folder:{tmp_path / 'none'}")
    (tmp_path / "flat" / "3.png").write_bytes(b"broken")
    broken = open_dataset(f"folder:{tmp_path / 'flat'}?size=8")
    with pytest.raises(UsageError, match="cannot read image"):
        broken.tensors()


# -- photo patches -------------------------------------------------------------------------------

def test_photo_patches_planted_labels_and_determinism(tmp_path):
    _png(tmp_path / "a_red.png", _solid(60, 80, (200, 10, 10)))
    _png(tmp_path / "b_blue.png", _solid(70, 50, (10, 10, 200)))
    stripes = np.zeros((64, 64, 3), dtype=np.uint8)
    stripes[:, ::2] = 255
    _png(tmp_path / "c_stripes.png", stripes)
    spec_text = f"photos:{tmp_path}?builtin=0&size=16&n=90"
    ds = open_dataset(spec_text, "train", seed=1)
    assert ds.classes == ["a_red", "b_blue", "c_stripes"] and ds.image_shape == (3, 16, 16) and len(ds) == 90
    x, y = ds.tensors()
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert set(y.tolist()) == {0, 1, 2}
    red, blue = x[y == 0], x[y == 1]
    assert torch.allclose(red[:, 0], torch.full_like(red[:, 0], 200 / 255), atol=1e-6)
    assert torch.allclose(blue[:, 2], torch.full_like(blue[:, 2], 200 / 255), atol=1e-6)
    assert np.all((ds.meta["scale"] >= 16 / 70 - 1e-9) & (ds.meta["scale"] <= 1.0))
    again = open_dataset(spec_text, "train", seed=1)
    assert torch.equal(again.tensors()[0], x) and torch.equal(again.tensors()[1], y)
    assert not torch.equal(open_dataset(spec_text, "train", seed=2).tensors()[0], x)
    assert not torch.equal(open_dataset(spec_text, "test", seed=1).tensors()[0], x)
    noflip = open_dataset(spec_text + "&flip=0", "train", seed=1)
    assert not noflip.meta["flip"].any() and ds.meta["flip"].any()


def test_builtin_photos_make_colour_patches():
    ds = open_dataset("photos?n=24&size=24", "train")
    assert ds.image_shape == (3, 24, 24) and len(ds) == 24
    assert ds.classes[:5] == [f"skimage:{n}" for n in photos.SKIMAGE_PHOTOS]
    x, _ = ds.tensors()
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert float((x - to_grey(x)).abs().mean()) > 0.01  # colour photos, not grey ones
    assert torch.equal(open_dataset("photos?n=24&size=24", "train").tensors()[0], x)
    grey = open_dataset("photos?n=24&size=24&grey=1", "train").tensors()[0]
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.allclose(luminance(grey), luminance(x), atol=1e-5)
    assert open_dataset("photos?n=24&size=24&channels=1", "train").image_shape == (1, 24, 24)
    with pytest.raises(UsageError, match="scale"):
        open_dataset("photos?scale=0.5-2")


# -- probes ---------------------------------------------------------------------------------------

def _fft_peak(image: np.ndarray) -> tuple[float, float]:
    """(orientation in degrees [0, 180), frequency in cycles per image) of the spectral peak."""
    size = image.shape[0]
    spectrum = np.abs(np.fft.fft2(image - image.mean()))
    ky, kx = np.unravel_index(np.argmax(spectrum), spectrum.shape)
    fy = ky if ky <= size // 2 else ky - size
    fx = kx if kx <= size // 2 else kx - size
    angle = np.rad2deg(np.arctan2(-fy, fx)) % 180.0  # rows grow downwards
    return float(angle), float(np.hypot(fx, fy))


def test_gratings_orientation_and_frequency_recovered_by_fft():
    images, info = gratings(64, orientations=[0, 30, 45, 90, 120, 157.5], frequencies=[4, 8, 12], phases=2,
                            channels=1)
    assert images.shape == (36, 1, 64, 64) and images.dtype == torch.float32
    assert all(v.shape == (36,) for v in info.values())
    for k in range(images.shape[0]):
        angle, freq = _fft_peak(images[k, 0].double().numpy())
        delta = abs((angle - info["orientation_deg"][k] + 90) % 180 - 90)
        assert delta < 6.0, (k, angle, info["orientation_deg"][k])
        assert abs(freq - info["frequency"][k]) < 0.8
    np.testing.assert_allclose(info["cycles_per_pixel"], info["frequency"] / 64)


def test_gratings_conventions():
    images, info = gratings(32, orientations=4, frequencies=[2], phases=[0.0], channels=3, contrast=0.5)
    assert info["orientation_deg"].tolist() == [0, 45, 90, 135]
    g = images[:, 0]
    assert torch.equal(images[:, 0], images[:, 2])  # achromatic
    assert torch.allclose(g[0], g[0][:1].expand(32, 32))  # 0 deg: brightness varies along x only
    assert torch.allclose(g[2], g[2][:, :1].expand(32, 32))  # 90 deg: along y only
    assert torch.allclose(g[1][:-1, :-1], g[1][1:, 1:], atol=1e-6)  # 45 deg: stripes run down-right
    assert float(g.max()) <= 0.75 + 1e-6 and float(g.min()) >= 0.25 - 1e-6  # contrast 0.5 about 0.5
    assert float(g.max()) > 0.74
    centred, _ = gratings(31, orientations=[0], frequencies=[3], phases=[0.0])
    assert float(centred[0, 0, 15, 15]) == pytest.approx(1.0)  # phase 0: crest through the centre
    with pytest.raises(UsageError, match="Nyquist"):
        gratings(16, frequencies=[8])


def test_gratings_dataset():
    ds = open_dataset("gratings?size=32&orientations=6&frequencies=2,4&phases=3")
    assert len(ds) == 36 and ds.image_shape == (3, 32, 32) and ds.num_classes == 6
    assert ds.classes[1] == "30deg"
    np.testing.assert_array_equal(ds.targets, ds.meta["orientation_index"])
    direct, _ = gratings(32, 6, [2, 4], 3)
    assert float((ds.tensors()[0] - direct).abs().max()) <= 0.5 / 255 + 1e-6
    assert open_dataset("gratings?size=16&channels=1&frequencies=2").image_shape == (1, 16, 16)
    assert open_dataset("gratings?size=16&orientations=0,90&frequencies=2").classes == ["0deg", "90deg"]


def test_to_grey_and_colour_pairs():
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    colour, grey = colour_and_grey(x)
    assert colour is x and grey.shape == x.shape
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    assert torch.allclose(luminance(grey), luminance(x), atol=1e-6)
    assert torch.allclose(grey[:, :1], 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:], atol=1e-6)
    assert to_grey(x[0]).shape == (3, 8, 8)  # a single image works too
    one = torch.rand(2, 1, 4, 4)
    assert torch.equal(to_grey(one), one)
    with pytest.raises(UsageError):
        to_grey(torch.rand(2, 4, 8, 8))


# -- the data set type and the loader --------------------------------------------------------------

def _toy(n: int = 10) -> ImageDataset:
    images = np.arange(n * 4, dtype=np.uint8).reshape(n, 1, 2, 2)
    return ImageDataset(images, np.arange(n) % 3, name="toy", classes=["a", "b", "c"],
                        meta={"k": np.arange(n) * 10})


def test_dataset_indexing():
    ds = _toy()
    x, y = ds[3]
    assert x.shape == (1, 2, 2) and y.dtype == torch.int64 and y.item() == 0
    assert float(x[0, 0, 0]) == pytest.approx(12 / 255)
    assert ds[-1][1].item() == 9 % 3
    xb, yb = ds[[1, 2]]
    assert xb.shape == (2, 1, 2, 2) and yb.tolist() == [1, 2]
    assert ds[torch.tensor([4])][1].tolist() == [1] and ds[2:4][1].tolist() == [2, 0]
    assert ds[np.arange(10) % 2 == 0][1].shape == (5,)
    sub = ds.subset([9, 0])
    assert sub.meta["k"].tolist() == [90, 0] and sub.classes == ds.classes and sub[0][1].item() == 0
    with pytest.raises(IndexError):
        ds[10]
    rgb = ds.with_channels("rgb")
    assert rgb.image_shape == (3, 2, 2) and torch.equal(rgb[0][0][0], rgb[0][0][2])


def test_make_loader_seeded_shuffling():
    ds = _toy(50)

    def order(loader):
        return torch.cat([y for _, y in loader]), torch.cat([x[:, 0, 0, 0] for x, _ in loader])

    a = list(make_loader(ds, batch_size=8, shuffle=True, seed=3))
    b = list(make_loader(ds, batch_size=8, shuffle=True, seed=3))
    c = list(make_loader(ds, batch_size=8, shuffle=True, seed=4))
    assert len(a) == 7 and a[0][0].shape == (8, 1, 2, 2) and a[-1][0].shape == (2, 1, 2, 2)
    first = torch.cat([x[:, 0, 0, 0] for x, _ in a])
    assert torch.equal(first, torch.cat([x[:, 0, 0, 0] for x, _ in b]))
    assert not torch.equal(first, torch.cat([x[:, 0, 0, 0] for x, _ in c]))
    assert sorted((first * 255 / 4).round().long().tolist()) == list(range(50))  # each item exactly once
    loader = make_loader(ds, batch_size=8, shuffle=True, seed=3)
    epoch1, epoch2 = order(loader), order(loader)
    assert not torch.equal(epoch1[1], epoch2[1])  # epochs differ, yet repeat for the seed:
    again = make_loader(ds, batch_size=8, shuffle=True, seed=3)
    assert torch.equal(order(again)[1], epoch1[1]) and torch.equal(order(again)[1], epoch2[1])
    plain = torch.cat([y for _, y in make_loader(ds, batch_size=16)])
    assert plain.tolist() == (np.arange(50) % 3).tolist()
    tensors = torch.utils.data.TensorDataset(torch.arange(20.0), torch.arange(20))
    assert [y.tolist() for _, y in make_loader(tensors, 5, shuffle=True, seed=1)] == \
        [y.tolist() for _, y in make_loader(tensors, 5, shuffle=True, seed=1)]


# -- specs -------------------------------------------------------------------------------------------

def test_spec_parsing_and_errors():
    parsed = parse_spec("folder:/data/imagenet?size=128&shuffle=1")
    assert (parsed.name, parsed.path, parsed.options) == ("folder", "/data/imagenet", {"size": "128", "shuffle": "1"})
    assert parse_spec("gratings").path is None
    with pytest.raises(UsageError, match="did you mean: fashion-mnist"):
        open_dataset("fashion-mnsit")
    with pytest.raises(UsageError, match="did you mean: shuffle"):
        open_dataset("bundled?shufle=1")
    with pytest.raises(UsageError, match="split"):
        open_dataset("bundled", "training")
    with pytest.raises(UsageError, match="folder:"):
        open_dataset("/some/where/images")
    with pytest.raises(UsageError, match="integer"):
        open_dataset("bundled?limit=many")
    with pytest.raises(UsageError, match="empty"):
        open_dataset("")
    with pytest.raises(UsageError, match="needs a folder"):
        open_dataset("cifar10")


def test_limit_shuffle_and_channel_options():
    base = open_dataset("bundled", "test")
    first = open_dataset("bundled", "test", limit=50)
    np.testing.assert_array_equal(first.targets, base.targets[:50])
    assert len(open_dataset("bundled?limit=30", "test", limit=50)) == 30
    s1 = open_dataset("bundled?shuffle=1", "test", limit=50, seed=5)
    s2 = open_dataset("bundled?shuffle=1", "test", limit=50, seed=5)
    s3 = open_dataset("bundled?shuffle=1", "test", limit=50, seed=6)
    assert torch.equal(s1.tensors()[0], s2.tensors()[0]) and not torch.equal(s1.tensors()[0], s3.tensors()[0])
    rgb = open_dataset("bundled?channels=3", "test", limit=4)
    x = rgb.tensors()[0]
    assert rgb.image_shape == (3, 28, 28) and torch.equal(x[:, 0], x[:, 2])
    assert torch.equal(x[:, :1], first.tensors(range(4))[0])
    with pytest.raises(UsageError, match="channels"):
        open_dataset("bundled?channels=2")


def test_size_option_resizes_any_data_set():
    ds = open_dataset("bundled?size=32&channels=3", "test", limit=6)
    x, _ = ds.tensors()
    assert ds.image_shape == (3, 32, 32) and x.shape == (6, 3, 32, 32)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert ds.subset([1, 2]).image_shape == (3, 32, 32) and ds[0][0].shape == (3, 32, 32)
    same = open_dataset("bundled?size=28", "test", limit=6)        # already 28 px: left as it is
    assert torch.equal(same.tensors()[0], open_dataset("bundled", "test", limit=6).tensors()[0])
    photos_ds = open_dataset("photos?n=4&channels=1&size=28")       # made at that size by the reader
    assert photos_ds.image_shape == (1, 28, 28)
    with pytest.raises(UsageError, match="size"):
        open_dataset("bundled?size=0")


def test_with_options_writes_the_spec_that_fits():
    from netanatomy.data import with_options

    assert with_options("photos", channels=1, size=28) == "photos?channels=1&size=28"
    assert with_options("bundled?limit=5&size=32", size=28) == "bundled?limit=5&size=28"
    assert open_dataset(with_options("bundled?limit=5", size=14), "test").image_shape == (1, 14, 14)
