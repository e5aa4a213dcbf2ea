"""Tiny datasets written in each format's exact on-disk layout, for tests.

Each writer puts what the real download leaves under ``root`` (the ``dataset.root``) and
returns what a loader must give back: images ``(N, C, H, W)`` uint8 at native size and
labels ``(N,)``. Pixels depend on the label (and on the image's index), so a test can
see that images and labels stayed together. The files differ from the official ones,
so their MD5 checks fail: load them with ``dataset.verify_checksums=false``.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]


@dataclass
class Written:
    """What a writer wrote: images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def labelled_images(n: int, channels: int, size: int, num_classes: int, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Noise images ``(n, C, size, size)`` whose first row holds the label and the index.

    Row 0 of channel 0 is the label, pixel (0, 1) of the last channel is ``index % 256``:
    a shuffled label or image shows at once.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n).astype(np.int64)
    y[: min(n, num_classes)] = np.arange(min(n, num_classes))  # every class, where n allows
    x = rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8)
    x[:, 0, 0, :] = y[:, None]
    x[:, -1, 1, 1] = np.arange(n) % 256
    return x, y


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the official batches are Python 2 pickles


def _cifar_entry(x: np.ndarray, y: np.ndarray, label_key: str, batch_label: str) -> dict:
    """One batch as the official files hold it: ``data`` (N, 3072) uint8 rows of R, G, B
    planes; labels a list of ints."""
    return {
        "batch_label": batch_label,
        label_key: [int(v) for v in y],
        "data": x.reshape(len(x), 3 * 32 * 32),
        "filenames": [f"img_{i:05d}.png" for i in range(len(x))],
    }


def write_cifar10(root: Path, per_batch: int = 6, n_test: int = 20, seed: int = 0) -> Written:
    """``<root>/cifar-10-batches-py/``: data_batch_1..5, test_batch, batches.meta."""
    folder = Path(root) / "cifar-10-batches-py"
    xs, ys = labelled_images(5 * per_batch, 3, 32, 10, seed)
    for b in range(5):
        sl = slice(b * per_batch, (b + 1) * per_batch)
        _pickle(folder / f"data_batch_{b + 1}",
                _cifar_entry(xs[sl], ys[sl], "labels", f"training batch {b + 1} of 5"))
    xt, yt = labelled_images(n_test, 3, 32, 10, seed + 1)
    _pickle(folder / "test_batch", _cifar_entry(xt, yt, "labels", "testing batch 1 of 1"))
    _pickle(folder / "batches.meta", {"num_cases_per_batch": per_batch,
                                      "label_names": CIFAR10_NAMES, "num_vis": 3072})
    (folder / "readme.html").write_text("<html>fixture</html>")
    return Written(xs, ys, xt, yt)


def write_cifar100(root: Path, n_train: int = 30, n_test: int = 20, seed: int = 0) -> Written:
    """``<root>/cifar-100-python/``: train, test, meta (fine and coarse labels)."""
    folder = Path(root) / "cifar-100-python"
    out = []
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        x, y = labelled_images(n, 3, 32, 100, s)
        entry = _cifar_entry(x, y, "fine_labels", f"{split}ing batch 1 of 1")
        entry["coarse_labels"] = [int(v) // 5 for v in y]
        _pickle(folder / split, entry)
        out += [x, y]
    _pickle(folder / "meta", {"fine_label_names": [f"fine_{i:02d}" for i in range(100)],
                              "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)]})
    return Written(*out)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file: magic (0, 0, type 0x08 = uint8, ndim), big-endian dims, the data."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_fashion_mnist(root: Path, n_train: int = 30, n_test: int = 20, seed: int = 0,
                        gz: bool = True, unpacked: bool = True) -> Written:
    """``<root>/FashionMNIST/raw/``: the four IDX files, gzipped and/or unpacked.

    torchvision's download leaves both (the archives and what it unpacked); it reads the
    unpacked ones.
    """
    raw = Path(root) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    out = []
    for prefix, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        x, y = labelled_images(n, 1, 28, 10, s)
        for name, arr in ((f"{prefix}-images-idx3-ubyte", x[:, 0]),
                          (f"{prefix}-labels-idx1-ubyte", y.astype(np.uint8))):
            data = idx_bytes(arr)
            if unpacked:
                (raw / name).write_bytes(data)
            if gz:
                with gzip.open(raw / f"{name}.gz", "wb") as f:
                    f.write(data)
        out += [x, y]
    return Written(*out)


#: Flat colours of the Tiny ImageNet fixture's classes, by position in sorted(wnids).
TINY_COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 210), (128, 128, 128)]
#: Unsorted on purpose: class index is the position in sorted(wnids.txt).
TINY_WNIDS = ["n09999999", "n01443537", "n04067472", "n02124075"]


def _jpeg(path: Path, colour: tuple[int, int, int], grey: bool, seed: int) -> None:
    """A 64x64 JPEG of one flat colour with a faint texture (grey ones in mode L)."""
    rng = np.random.default_rng(seed)
    img = np.empty((64, 64, 3), dtype=np.int16)
    img[:] = colour
    img += rng.integers(-3, 4, (64, 64, 1), dtype=np.int16)
    img = img.clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = Image.fromarray(img[:, :, 0] if grey else img, mode="L" if grey else "RGB")
    pil.save(path, format="JPEG", quality=95)


@dataclass
class TinyWritten:
    """Labels (class = position in sorted wnids) in the loader's order; images are flat
    colours :data:`TINY_COLOURS` ``[label]``."""

    y_train: np.ndarray
    y_test: np.ndarray
    train_files: list[Path]
    val_files: list[Path]


def write_tiny_imagenet(root: Path, per_class: int = 6, val_per_class: int = 5) -> TinyWritten:
    """``<root>/tiny-imagenet-200/`` as the official zip unpacks, with four classes.

    wnids.txt, words.txt, train/<wnid>/images/<wnid>_<i>.JPEG with <wnid>_boxes.txt,
    val/images/val_<k>.JPEG with val/val_annotations.txt (filename, wnid, x0, y0, x1,
    y1; tab-separated) and an unlabelled test/images/. The grey class is saved as
    one-channel JPEGs, as some of the real images are.
    """
    folder = Path(root) / "tiny-imagenet-200"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("".join(f"{w}\n" for w in TINY_WNIDS))
    (folder / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in TINY_WNIDS))
    order = sorted(TINY_WNIDS)
    y_train, train_files = [], []
    for w in order:
        c = order.index(w)
        boxes = []
        for i in range(per_class):
            name = f"{w}_{i}.JPEG"
            path = folder / "train" / w / "images" / name
            _jpeg(path, TINY_COLOURS[c], grey=c == 3, seed=c * 1000 + i)
            boxes.append(f"{name}\t0\t0\t63\t63\n")
            y_train.append(c)
            train_files.append(path)
        (folder / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes))
    lines, y_val, val_files = [], [], []
    for k in range(val_per_class * len(order)):
        c = (k * 3) % len(order)  # interleaved classes, as in the real annotations
        path = folder / "val" / "images" / f"val_{k}.JPEG"
        _jpeg(path, TINY_COLOURS[c], grey=c == 3, seed=50_000 + k)
        lines.append(f"val_{k}.JPEG\t{order[c]}\t0\t0\t63\t63\n")
        y_val.append(c)
        val_files.append(path)
    (folder / "val" / "val_annotations.txt").write_text("".join(lines))
    _jpeg(folder / "test" / "images" / "test_0.JPEG", (10, 10, 10), grey=False, seed=7)
    return TinyWritten(np.array(y_train), np.array(y_val), train_files, val_files)


#: Writers by dataset name (``dataset=<name>``).
WRITERS = {
    "cifar10": write_cifar10,
    "cifar100": write_cifar100,
    "fashion_mnist": write_fashion_mnist,
    "tiny_imagenet": write_tiny_imagenet,
}
