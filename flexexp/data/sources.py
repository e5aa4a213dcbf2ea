"""Dataset sources: each turns a :class:`~flexexp.config.DatasetConfig` into uint8 arrays.

A source returns :class:`ImageArrays` (``x`` as ``(N, C, H, W)`` uint8 at the
configured image size, ``y`` as ``(N,)`` int64) for the train and test splits. Sources
are looked up by name in :data:`DATASETS`; the paper's four datasets live in
:mod:`flexexp.data.paper` (decoded once into :mod:`flexexp.data.cache`), digits and
synthetic are made in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flexexp.errors import ConfigError, DataError
from flexexp.schema import DatasetConfig

__all__ = ["ImageArrays", "DATASETS", "DataError", "load_arrays", "fit_size", "subsample_split",
           "split_validation", "fingerprint"]


@dataclass
class ImageArrays:
    """Train and test splits as uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)``;
    with ``dataset.val_fraction > 0`` also the validation split carved from the training
    images (:func:`split_validation`; None without one)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_val: Tensor | None = None
    y_val: Tensor | None = None

    def splits(self) -> list[tuple[str, Tensor, Tensor]]:
        """``(name, images, labels)`` of train, test and (if there is one) val."""
        out = [("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)]
        if self.x_val is not None and self.y_val is not None:
            out.append(("val", self.x_val, self.y_val))
        return out

    def check(self, spec: DatasetConfig) -> None:
        """Raise :class:`DataError` unless shapes, dtypes and labels match the config."""
        want = (spec.in_channels, spec.image_size, spec.image_size)
        for split, x, y in self.splits():
            if x.dtype != torch.uint8 or tuple(x.shape[1:]) != want:
                raise DataError(
                    f"{spec.name}: {split} images are {x.dtype} {tuple(x.shape[1:])}, expected "
                    f"uint8 {want}; check dataset.in_channels and dataset.image_size."
                )
            if len(x) != len(y) or len(y) == 0:
                raise DataError(f"{spec.name}: {split} split has {len(x)} images, {len(y)} labels.")
            if int(y.min()) < 0 or int(y.max()) >= spec.num_classes:
                raise DataError(
                    f"{spec.name}: {split} labels span {int(y.min())}..{int(y.max())} but "
                    f"dataset.num_classes={spec.num_classes}."
                )


def fingerprint(arrays: ImageArrays) -> str:
    """16 hex digits of a hash of every image and label of every split (with their shapes):
    the identity of the data a run trained on, whatever folder or download it came from.
    Without a validation split it is the hash of train and test alone, as it always was."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    for t in (t for _, x, y in arrays.splits() for t in (x, y)):
        h.update(f"{tuple(t.shape)}{t.dtype};".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def fit_size(x: Tensor, size: int) -> Tensor:
    """Bring uint8 images ``(N, C, h, w)`` to ``(N, C, size, size)``.

    Equal size: unchanged. A smaller square image whose margin is even (28 -> 32) is
    zero-padded, keeping pixels exact; anything else is resized with antialiasing.
    """
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if h == w and h < size and (size - h) % 2 == 0:
        m = (size - h) // 2
        return F.pad(x, (m, m, m, m))
    out = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def subsample_split(x: Tensor, y: Tensor, n: int | None, seed: int) -> tuple[Tensor, Tensor]:
    if n is None or n >= len(y):
        return x, y
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def load_digits(spec: DatasetConfig) -> ImageArrays:
    """scikit-learn's digits (values 0..16 scaled to 0..255), stratified 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    images = np.rint(data.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    labels = data.target.astype(np.int64)
    rng = np.random.default_rng(spec.data_seed)
    train_idx, test_idx = [], []
    for c in np.unique(labels):  # stratified, so every class is in both splits
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(len(idx) * 0.2)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr, te = np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    x_tr, y_tr = subsample_split(x[tr], y[tr], spec.train_size, spec.data_seed)
    x_te, y_te = subsample_split(x[te], y[te], spec.test_size, spec.data_seed + 1)
    return ImageArrays(fit_size(x_tr, spec.image_size), y_tr, fit_size(x_te, spec.image_size), y_te)


def load_synthetic(spec: DatasetConfig) -> ImageArrays:
    """Procedural images: a random smooth pattern per class plus per-image noise."""
    g = torch.Generator().manual_seed(spec.data_seed)
    k, c, s = spec.num_classes, spec.in_channels, spec.image_size
    coarse = torch.rand(k, c, max(2, s // 4), max(2, s // 4), generator=g)
    protos = F.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)

    def make(n: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(n) % k
        y = y[torch.randperm(n, generator=g)]
        x = protos[y] + 0.25 * torch.randn(n, c, s, s, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y.long()

    n_train = spec.train_size if spec.train_size is not None else 2000
    n_test = spec.test_size if spec.test_size is not None else 500
    x_tr, y_tr = make(n_train)
    x_te, y_te = make(n_test)
    return ImageArrays(x_tr, y_tr, x_te, y_te)


def _paper(name: str) -> Callable[[DatasetConfig], ImageArrays]:
    def load(spec: DatasetConfig) -> ImageArrays:
        from flexexp.data import paper

        return paper.load(name, spec)

    load.__name__ = f"load_{name}"
    return load


#: Dataset sources by name (``dataset.source``).
DATASETS: dict[str, Callable[[DatasetConfig], ImageArrays]] = {
    "digits": load_digits,
    "synthetic": load_synthetic,
    "cifar10": _paper("cifar10"),
    "cifar100": _paper("cifar100"),
    "fashion_mnist": _paper("fashion_mnist"),
    "tiny_imagenet": _paper("tiny_imagenet"),
}


def load_arrays(spec: DatasetConfig) -> ImageArrays:
    """Load the dataset ``spec.source`` at ``spec.image_size`` and check it against ``spec``."""
    try:
        source = DATASETS[spec.source]
    except KeyError:
        raise DataError(
            f"unknown dataset source {spec.source!r}; valid: {', '.join(sorted(DATASETS))}"
        ) from None
    arrays = source(spec)
    arrays.check(spec)
    return split_validation(arrays, spec.val_fraction, spec.data_seed)


def split_validation(arrays: ImageArrays, fraction: float, data_seed: int) -> ImageArrays:
    """Hold out ``fraction`` of the training images as the validation split.

    Stratified (each class gives ``round(fraction * its training images)``) and seeded
    by ``dataset.data_seed`` alone, so every seed and variant of a grid sees the same
    split. Both parts keep the images' order in the training split. ``fraction == 0``
    returns ``arrays`` itself: the same training images in the same order as ever.
    """
    if fraction == 0:
        return arrays
    y = arrays.y_train
    gen = torch.Generator().manual_seed(data_seed)
    held = []
    for c in torch.unique(y).tolist():  # ascending: the draws do not depend on the order
        idx = torch.nonzero(y == c).flatten()
        n_val = round(len(idx) * fraction)
        if not 0 < n_val < len(idx):
            raise ConfigError(
                f"dataset.val_fraction={fraction} of class {c}'s {len(idx)} training images "
                f"leaves {'no validation' if n_val == 0 else 'no training'} image for it: "
                f"choose a fraction that keeps at least one of each, e.g. "
                f"dataset.val_fraction=0.1 (or a larger dataset.train_size).")
        held.append(idx[torch.randperm(len(idx), generator=gen)[:n_val]])
    is_val = torch.zeros(len(y), dtype=torch.bool)
    is_val[torch.cat(held)] = True
    keep = ~is_val
    return ImageArrays(arrays.x_train[keep], y[keep], arrays.x_test, arrays.y_test,
                       arrays.x_train[is_val], y[is_val])
