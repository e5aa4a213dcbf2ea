"""The paper's four datasets: CIFAR-10, CIFAR-100, Fashion-MNIST and Tiny ImageNet.

Each lives under ``dataset.root`` in its standard folder, laid out as torchvision (or
the official zip) leaves it::

    <root>/cifar-10-batches-py/      data_batch_1..5, test_batch, batches.meta
    <root>/cifar-100-python/         train, test, meta
    <root>/FashionMNIST/raw/         {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    <root>/tiny-imagenet-200/        wnids.txt, train/<wnid>/images/*.JPEG,
                                     val/images/*.JPEG, val/val_annotations.txt

Loading a dataset runs three steps: *fetch* makes the files present (downloading with
torchvision's utilities when ``dataset.download`` allows), *sources* lists the files
whose names, sizes and mtimes key the cache, and *decode* turns them into uint8
``(N, C, S, S)`` images at ``dataset.image_size`` and int64 labels; the result is kept
in :mod:`flexexp.data.cache`, so only the first run decodes. CIFAR and Fashion-MNIST
are parsed by torchvision's own dataset classes, checksums included; with
``dataset.verify_checksums=false`` the MD5 checks are skipped (for files that are not
the official ones, such as test fixtures). Every failure a user can fix is raised as
:class:`~flexexp.errors.DataError` naming the dataset, the path and the fix.

torchvision is imported only to fetch or decode: importing it costs seconds (it pulls in
torch._dynamo), which a run that hits the cache need not pay. The file names below are
the official ones, the same as torchvision's classes hold (a test compares them).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import logging
import os
import pickle
import shlex
import shutil
import tarfile
import urllib.error
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from flexexp.data import cache
from flexexp.data.sources import ImageArrays, fit_size, subsample_split
from flexexp.errors import DataError
from flexexp.schema import DatasetConfig

log = logging.getLogger(__name__)

__all__ = ["PaperDataset", "PAPER", "data_root", "fetch_command", "prepare", "subsample", "load"]

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FMNIST_FOLDER = "FashionMNIST/raw"
#: Train images, train labels, test images, test labels (each also served as .gz).
FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
#: MD5 of each unpacked IDX file: the published dataset's content, whoever compressed it.
#: The .gz archives' own MD5s differ by packager (Debian's package recompressed them), so
#: a file is judged by its content; torchvision's list of the upstream .gz MD5s is
#: accepted too (a match there spares unpacking to check).
FMNIST_CONTENT_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
#: Where Debian's and Ubuntu's package ``dataset-fashion-mnist`` installs the official
#: ``.gz`` files; ``download`` copies them from there before trying the network.
FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_PACKAGE = "dataset-fashion-mnist"
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_ZIP = "tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_FOLDER = "tiny-imagenet-200"
_RESIZE_CHUNK = 4096  # images resized at once: bounds the float copy fit_size makes


@dataclass(frozen=True)
class PaperDataset:
    """How to fetch, list and decode one dataset under ``dataset.root``.

    ``fetch(name, root, spec)`` makes the decodable files present or raises;
    ``sources(root)`` lists them (the cache key); ``decode(name, root, spec)`` returns
    the full splits at ``spec.image_size``.
    """

    folder: str  # the standard folder under dataset.root
    layout: str  # the expected files, for error messages
    url: str
    fetch: Callable[[str, Path, DatasetConfig], None]
    sources: Callable[[Path], Sequence[str | Path]]
    decode: Callable[[str, Path, DatasetConfig], ImageArrays]


# ---------------------------------------------------------------------------- messages


def data_root(spec: DatasetConfig) -> Path:
    """``dataset.root`` as an absolute path (``~`` expanded)."""
    return Path(spec.root).expanduser().resolve()


def fetch_command(name: str, root: Path | str) -> str:
    """The command that downloads ``name`` into ``root``."""
    return f"python -m flexexp.data download dataset={name} dataset.root={shlex.quote(str(root))}"


def _system_hint(name: str) -> str:
    """Where a system package provides ``name`` without a network (Fashion-MNIST only)."""
    if name != "fashion_mnist":
        return ""
    if _fmnist_system_files() is not None:
        return (f" The package {FMNIST_PACKAGE} is installed: the download command copies its "
                f"files from {FMNIST_SYSTEM_DIR}/ (no network needed).")
    return (f" On Debian/Ubuntu, `apt-get install {FMNIST_PACKAGE}` installs the official files "
            f"in {FMNIST_SYSTEM_DIR}/, which the download command then copies (no network "
            f"needed).")


def _missing(name: str, root: Path, what: Path) -> DataError:
    ds = PAPER[name]
    return DataError(
        f"{name}: no data at {root / ds.folder} ({what.name} is missing) and "
        f"dataset.download=false. Fetch it with `{fetch_command(name, root)}` (or run with "
        f"dataset.download=true), point dataset.root (or FLEXEXP_DATA) at the folder that "
        f"holds {ds.folder}/, or place the files there by hand: {root}/{ds.layout}."
        f"{_system_hint(name)}"
    )


def _no_download(name: str, root: Path, exc: BaseException) -> DataError:
    ds = PAPER[name]
    # torchvision's MNIST wraps the URLError in a RuntimeError whose last line is its text
    lines = str(getattr(exc, "reason", None) or exc).strip().splitlines()
    reason = lines[-1] if lines else type(exc).__name__
    return DataError(
        f"{name}: could not download {ds.url} into {root} ({reason}). This machine seems to "
        f"have no network access (or the server is down). On a machine that has it, run "
        f"`{fetch_command(name, 'DIR')}` and copy DIR/{ds.folder}/ to {root}/, or place the "
        f"files there by hand: {root}/{ds.layout}; then run again with dataset.download=false."
        f"{_system_hint(name)}"
    )


def _corrupt(name: str, root: Path, path: Path | str, why: str) -> DataError:
    """``path`` cannot be read at all (not unpackable, not parseable): damaged for sure."""
    return DataError(
        f"{name}: {path} is corrupt or truncated ({why}). Delete it and fetch the data "
        f"again with `{fetch_command(name, root)}`.{_system_hint(name)}"
    )


def _is_system_error(exc: BaseException) -> bool:
    """An ``OSError`` from the system (permission denied, a folder, an I/O error), not from
    a file format: gzip's ``BadGzipFile``, PIL's ``UnidentifiedImageError`` and "image file
    is truncated" carry no errno, so a damaged file is never mistaken for this."""
    return isinstance(exc, OSError) and exc.errno is not None


def _unreadable(name: str, root: Path, path: Path | str, exc: OSError) -> DataError:
    """``path`` (or the file ``exc`` names) cannot be accessed: say why, never "corrupt",
    since the data may be whole and deleting it would be the wrong fix."""
    where = exc.filename or path
    why = exc.strerror or type(exc).__name__
    if isinstance(exc, PermissionError):
        fix = (f"this user may not read or write it ({why}). The data itself may be fine: do "
               f"not delete it. Fix its permissions (e.g. `chmod -R u+rwX "
               f"{shlex.quote(str(root / PAPER[name].folder))}`, or ask its owner) or point "
               f"dataset.root (or FLEXEXP_DATA) at a copy this user can read.")
    elif isinstance(exc, IsADirectoryError):
        fix = (f"it is a folder where a file is expected ({why}). Move the folder away and "
               f"place the file there: {root}/{PAPER[name].layout}.")
    else:
        fix = (f"the system could not read it ({why}; errno {exc.errno}). Check the disk or "
               f"the mount that holds {root}, then run again.")
    return DataError(f"{name}: cannot access {where}: {fix}")


def _read_failed(name: str, root: Path, path: Path | str, exc: BaseException, what: str
                 ) -> DataError:
    """:func:`_unreadable` for a system error, :func:`_corrupt` for damaged bytes."""
    if _is_system_error(exc):
        return _unreadable(name, root, path, exc)  # type: ignore[arg-type]
    return _corrupt(name, root, path, f"{what}: {exc}")


def md5_of(path: Path | str, unpack: bool = False) -> str:
    """MD5 of a file's bytes, or of its gunzipped content with ``unpack``."""
    digest = hashlib.md5()
    with (gzip.open if unpack else open)(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _not_official(name: str, root: Path, path: Path, got: str, want: str, unpacked: bool
                  ) -> DataError:
    """A readable file whose content is not the official one: say how to check it
    before anyone deletes it, since it may be the user's own on purpose."""
    check = f"gunzip -c {shlex.quote(str(path))} | md5sum" if unpacked else \
        f"md5sum {shlex.quote(str(path))}"
    what = "its unpacked content" if unpacked else "its content"
    return DataError(
        f"{name}: {path} is not the official data: the MD5 of {what} is {got}, the official "
        f"one is {want} (check with `{check}`). If it is a damaged or partial copy, delete "
        f"it and fetch the data again with `{fetch_command(name, root)}`.{_system_hint(name)} "
        f"If you made it yourself (a test fixture, a converted copy), run with "
        f"dataset.verify_checksums=false to skip the MD5 checks."
    )


def _bad_layout(name: str, root: Path, what: str) -> DataError:
    ds = PAPER[name]
    return DataError(
        f"{name}: {root / ds.folder} does not have the official layout: {what}. Expected "
        f"{root}/{ds.layout}. Unpack the official archive there again (or delete the folder "
        f"and run `{fetch_command(name, root)}`)."
    )


# ---------------------------------------------------------------------------- fetching


def _remove_new(paths: list[Path], existed: set[Path]) -> None:
    """Delete what a failed download created, so no partial file passes as good data."""
    for p in paths:
        if p in existed:
            continue
        with contextlib.suppress(OSError):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)


def _fetch(
    name: str,
    root: Path,
    spec: DatasetConfig,
    missing: Callable[[], Path | None],
    download: Callable[[], None],
    created: list[Path],
    archive: Path,
) -> None:
    """Run ``download()`` if ``missing()`` names a needed file that is absent; turn its
    failures into :class:`DataError`.

    ``created`` lists the archives, files and folders a download writes: those that did
    not exist before are removed when it fails (or is interrupted); ``archive`` is named
    when unpacking fails. A lock keeps concurrent runs from downloading the same archive
    at once.
    """
    first_missing = missing()
    if first_missing is None:
        return
    if not spec.download:
        raise _missing(name, root, first_missing)
    with cache.file_lock(root / cache.CACHE_DIR / f".{name}.download.lock"):
        if missing() is None:  # another run downloaded it while this one waited
            return
        existed = {p for p in created if p.exists()}
        log.info("%s: downloading %s into %s", name, PAPER[name].url, root)
        try:
            download()
        except (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError) as exc:
            _remove_new(created, existed)
            raise _corrupt(name, root, archive, f"the downloaded archive cannot be unpacked: "
                           f"{exc}") from None
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            _remove_new(created, existed)
            if _is_system_error(exc) and exc.filename and \
                    not isinstance(exc, urllib.error.URLError):  # a local file, not the network
                raise _unreadable(name, root, exc.filename, exc) from None
            raise _no_download(name, root, exc) from None
        except BaseException:  # Ctrl-C mid-download: no partial archive may look complete
            _remove_new(created, existed)
            raise
    if missing() is not None:
        raise _bad_layout(name, root, f"the download finished but {missing()} is absent")


# ---------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class _CifarFiles:
    """The files of one CIFAR version and the torchvision class that reads them."""

    folder: str
    batches: tuple[str, ...]  # the training batches, then the test batch
    meta: str
    archive: str
    tv_class: str

    @property
    def url(self) -> str:
        return CIFAR_URL + self.archive


_CIFAR = {
    "cifar10": _CifarFiles("cifar-10-batches-py", (*(f"data_batch_{i}" for i in range(1, 6)),
                                                   "test_batch"),
                           "batches.meta", "cifar-10-python.tar.gz", "CIFAR10"),
    "cifar100": _CifarFiles("cifar-100-python", ("train", "test"), "meta",
                            "cifar-100-python.tar.gz", "CIFAR100"),
}


@functools.cache
def _unverified(cls: type) -> type:
    """``cls`` with every MD5 set to None: torchvision's ``check_integrity`` then only
    checks that each file exists (``dataset.verify_checksums=false``)."""
    if hasattr(cls, "train_list"):  # CIFAR10 and its subclass CIFAR100
        attrs = {
            "tgz_md5": None,
            "train_list": [[f, None] for f, _ in cls.train_list],
            "test_list": [[f, None] for f, _ in cls.test_list],
            "meta": {**cls.meta, "md5": None},
        }
    else:
        attrs = {"resources": [(f, None) for f, _ in cls.resources]}
    return type(f"Unverified{cls.__name__}", (cls,), attrs)


def _cifar_class(name: str, verify: bool) -> type:
    """torchvision's class for ``name``; without its MD5 checks unless ``verify``."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, _CIFAR[name].tv_class)
    return cls if verify else _unverified(cls)


def _cifar_sources(name: str, root: Path) -> list[Path]:
    files = _CIFAR[name]
    return [root / files.folder / f for f in (*files.batches, files.meta)]


def _fetch_cifar(name: str, root: Path, spec: DatasetConfig) -> None:
    files = _cifar_sources(name, root)
    archive = root / _CIFAR[name].archive
    _fetch(name, root, spec,
           missing=lambda: next((p for p in files if not p.is_file()), None),
           # the class's own download: the archive, its MD5, the unpacking
           download=lambda: _cifar_class(name, spec.verify_checksums)(
               str(root), train=False, download=True),
           created=[archive, root / _CIFAR[name].folder, *files],
           archive=archive)


def _diagnose_cifar(name: str, root: Path, spec: DatasetConfig, exc: Exception) -> DataError:
    """Find the file torchvision choked on and say what is wrong with it."""
    from torchvision.datasets.utils import check_integrity

    cls = _cifar_class(name, verify=True)
    md5s = dict(cls.train_list + cls.test_list + [[cls.meta["filename"], cls.meta["md5"]]])
    for path in _cifar_sources(name, root):
        if not path.is_file():
            return _missing(name, root, path)
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as err:
            return _read_failed(name, root, path, err, "cannot be opened")
        if spec.verify_checksums and not check_integrity(str(path), md5s[path.name]):
            return _not_official(name, root, path, md5_of(path), md5s[path.name], False)
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
        except Exception as err:
            return _read_failed(name, root, path, err,
                                f"cannot be unpickled: {type(err).__name__}")
        if path.name == cls.meta["filename"]:
            if cls.meta["key"] not in entry:
                return _corrupt(name, root, path, f"no {cls.meta['key']!r} entry")
            continue
        labels = entry.get("labels", entry.get("fine_labels"))
        data = entry.get("data")
        if data is None or labels is None:
            return _corrupt(name, root, path, "no 'data' or no labels entry")
        if data.size % 3072 or len(labels) * 3072 != data.size:
            return _corrupt(name, root, path, f"{data.size} bytes of images for "
                            f"{len(labels)} labels of 3x32x32")
    return DataError(f"{name}: torchvision cannot read {root / _CIFAR[name].folder}: {exc}. "
                     f"Delete the folder and fetch it again with `{fetch_command(name, root)}`.")


def _decode_cifar(name: str, root: Path, spec: DatasetConfig) -> ImageArrays:
    """Both splits via torchvision's CIFAR class: ``.data`` (N, 32, 32, 3) -> (N, 3, S, S)."""
    cls = _cifar_class(name, spec.verify_checksums)
    try:
        splits = [cls(str(root), train=train) for train in (True, False)]
    except Exception as exc:  # torchvision raises RuntimeError, pickle and numpy errors alike
        raise _diagnose_cifar(name, root, spec, exc) from None
    for ds in splits:  # torchvision does not compare the two counts
        if len(ds.data) != len(ds.targets):
            raise _diagnose_cifar(name, root, spec, ValueError(
                f"{len(ds.data)} images, {len(ds.targets)} labels"))
    out: list[Tensor] = []
    for ds in splits:
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW
        out += [_fit(x, spec.image_size), torch.as_tensor(ds.targets, dtype=torch.int64)]
    return ImageArrays(*out)


# ---------------------------------------------------------------------------- Fashion-MNIST


def _fmnist_files(root: Path) -> list[tuple[Path, Path]]:
    """``(archive .gz, unpacked file)`` for the four files."""
    raw = root / FMNIST_FOLDER
    return [(raw / f"{f}.gz", raw / f) for f in FMNIST_FILES]


def _fmnist_sources(root: Path) -> list[Path]:
    return [raw for _, raw in _fmnist_files(root)]


def _fmnist_class(verify: bool) -> type:
    from torchvision.datasets import FashionMNIST

    return FashionMNIST if verify else _unverified(FashionMNIST)


def _fmnist_system_files() -> list[Path] | None:
    """The four official .gz files from the system package, or None if any is absent."""
    files = [FMNIST_SYSTEM_DIR / f"{f}.gz" for f in FMNIST_FILES]
    return files if all(p.is_file() for p in files) else None


def _verify_fmnist_gz(name: str, root: Path, gz: Path) -> None:
    """Accept ``gz`` if it is an upstream archive (torchvision's MD5) or if its unpacked
    content is the published dataset's (any recompression, Debian's included)."""
    upstream = dict(_fmnist_class(verify=True).resources)
    want = FMNIST_CONTENT_MD5[gz.name.removesuffix(".gz")]
    try:
        if md5_of(gz) == upstream.get(gz.name):
            return
        got = md5_of(gz, unpack=True)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise _read_failed(name, root, gz, exc, "cannot be unpacked") from None
    if got != want:
        raise _not_official(name, root, gz, got, want, unpacked=True)


def _verify_fmnist_raw(name: str, root: Path, raw: Path) -> None:
    want = FMNIST_CONTENT_MD5[raw.name]
    try:
        got = md5_of(raw)
    except OSError as exc:
        raise _read_failed(name, root, raw, exc, "cannot be read") from None
    if got != want:
        raise _not_official(name, root, raw, got, want, unpacked=False)


def _copy_system_fmnist(name: str, root: Path) -> None:
    """Copy the system package's .gz files that ``root`` lacks (atomically, each)."""
    system = _fmnist_system_files()
    if system is None:
        return
    for src, (gz, raw) in zip(system, _fmnist_files(root), strict=True):
        if gz.is_file() or raw.is_file():
            continue
        gz.parent.mkdir(parents=True, exist_ok=True)
        tmp = gz.with_name(f".{gz.name}.{os.getpid()}.tmp")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, gz)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("%s: copied %s from %s (package %s)", name, gz, src, FMNIST_PACKAGE)


def _fetch_fmnist(name: str, root: Path, spec: DatasetConfig) -> None:
    files = _fmnist_files(root)

    def missing() -> Path | None:
        # the unpacked files, or the archives a hand copy may hold (unpacked below)
        return next((raw for gz, raw in files if not raw.is_file() and not gz.is_file()), None)

    if spec.download and missing() is not None:
        with cache.file_lock(root / cache.CACHE_DIR / f".{name}.download.lock"):
            _copy_system_fmnist(name, root)  # before the network, when the package is there
    _fetch(name, root, spec, missing=missing,
           download=lambda: _fmnist_class(spec.verify_checksums)(
               str(root), train=False, download=True),
           created=[(root / FMNIST_FOLDER).parent, *(p for pair in files for p in pair)],
           archive=root / FMNIST_FOLDER)
    for gz, raw in files:
        if raw.is_file():
            continue
        if spec.verify_checksums:
            _verify_fmnist_gz(name, root, gz)
        tmp = raw.with_name(f".{raw.name}.{os.getpid()}.tmp")
        try:  # unpacked beside, then renamed: an interrupted unpack leaves no partial file
            with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, raw)
        except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            raise _read_failed(name, root, gz, exc, "cannot be unpacked") from None
        finally:
            tmp.unlink(missing_ok=True)


def _read_idx(name: str, root: Path, path: Path, images: bool) -> Tensor:
    """One IDX file through torchvision's parser; names the file when it fails."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    try:
        return read_image_file(str(path)) if images else read_label_file(str(path))
    except Exception as exc:  # the parser asserts and reshapes: other errors mean bad bytes
        raise _read_failed(name, root, path, exc,
                           f"not a valid IDX file: {type(exc).__name__}") from None


def _decode_fmnist(name: str, root: Path, spec: DatasetConfig) -> ImageArrays:
    """Both splits via torchvision's FashionMNIST: ``.data`` (N, 28, 28) -> (N, 1, S, S)."""
    raws = _fmnist_sources(root)
    if spec.verify_checksums:  # the bytes about to be decoded, against the published content
        for raw in raws:
            _verify_fmnist_raw(name, root, raw)
    cls = _fmnist_class(verify=False)  # checked above; the class would check the .gz MD5s
    out: list[Tensor] = []
    for train, (images, labels) in ((True, raws[:2]), (False, raws[2:])):
        try:
            ds = cls(str(root), train=train)
            x, y = ds.data, ds.targets
        except Exception:  # find and name the bad file
            x, y = _read_idx(name, root, images, True), _read_idx(name, root, labels, False)
        if len(x) != len(y):
            raise _corrupt(name, root, labels, f"{len(y)} labels for the {len(x)} images "
                           f"in {images.name}")
        out += [_fit(x[:, None].contiguous(), spec.image_size), y.to(torch.int64)]
    return ImageArrays(*out)


# ---------------------------------------------------------------------------- Tiny ImageNet


def _fetch_tiny(name: str, root: Path, spec: DatasetConfig) -> None:
    folder = root / TINY_FOLDER
    md5 = TINY_MD5 if spec.verify_checksums else None

    def download() -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(TINY_URL, str(root), filename=TINY_ZIP, md5=md5)

    _fetch(name, root, spec,
           missing=lambda: None if folder.is_dir() else folder,
           download=download,
           created=[root / TINY_ZIP, folder],
           archive=root / TINY_ZIP)


@dataclass
class _TinyIndex:
    """Image files and class indices of both splits (class = position in sorted wnids)."""

    wnids: list[str]
    train: list[tuple[str, int]]  # plain strings: 110,000 Path objects cost a second a run
    val: list[tuple[str, int]]
    listings: list[Path]  # wnids.txt and val_annotations.txt


def _tiny_index(name: str, root: Path) -> _TinyIndex:
    """Read wnids.txt, the train folders and val_annotations.txt; check the layout."""
    try:
        return _read_tiny_index(name, root)
    except OSError as exc:  # permission denied on a listing or a folder: not a bad layout
        if not _is_system_error(exc):
            raise
        raise _unreadable(name, root, exc.filename or root / TINY_FOLDER, exc) from None


def _read_tiny_index(name: str, root: Path) -> _TinyIndex:
    folder = root / TINY_FOLDER
    wnids_file = folder / "wnids.txt"
    ann_file = folder / "val" / "val_annotations.txt"
    for need in (wnids_file, ann_file):
        if not need.is_file():
            raise _bad_layout(name, root, f"{need.relative_to(folder)} is missing")
    wnids = sorted({w.strip() for w in wnids_file.read_text().split() if w.strip()})
    if not wnids:
        raise _bad_layout(name, root, "wnids.txt lists no class")
    index = {w: i for i, w in enumerate(wnids)}
    train: list[tuple[str, int]] = []
    for w in wnids:
        images = os.path.join(folder, "train", w, "images")
        if not os.path.isdir(images):
            raise _bad_layout(name, root, f"train/{w}/images/ is missing")
        names = sorted(e.name for e in os.scandir(images) if e.name.endswith(".JPEG"))
        train += [(os.path.join(images, n), index[w]) for n in names]
    val_images = os.path.join(folder, "val", "images")
    val: list[tuple[str, int]] = []
    for n, line in enumerate(ann_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise _corrupt(name, root, ann_file, f"line {n} is not 'filename<TAB>wnid<TAB>"
                           f"bbox' with a wnid from wnids.txt: {line[:80]!r}")
        val.append((os.path.join(val_images, fields[0]), index[fields[1]]))
    if not train or not val:
        raise _bad_layout(name, root, f"no {'train' if not train else 'val'} images")
    return _TinyIndex(wnids, train, val, [wnids_file, ann_file])


def _tiny_sources(root: Path) -> list[str | Path]:
    idx = _tiny_index("tiny_imagenet", root)
    return idx.listings + [p for p, _ in idx.train] + [p for p, _ in idx.val]


def _read_jpeg(name: str, root: Path, path: str) -> Tensor:
    """One image as uint8 (3, H, W); grey JPEGs (Tiny ImageNet has some) become RGB."""
    if not os.path.isfile(path):
        raise _bad_layout(name, root, f"{path} is listed but missing")
    try:
        with Image.open(path) as img:  # PIL: torchvision.io's decoders are deprecated
            pixels = np.array(img.convert("RGB"))  # (H, W, 3)
    except (OSError, ValueError, SyntaxError) as exc:  # truncated, not an image, bad header
        raise _read_failed(name, root, path, exc, "unreadable image") from None
    return torch.from_numpy(pixels).permute(2, 0, 1)


def _decode_images(name: str, root: Path, paths: list[str], size: int) -> Tensor:
    """Decode ``paths`` into uint8 ``(N, 3, size, size)``, a chunk at a time."""
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for start in range(0, len(paths), _RESIZE_CHUNK):
        chunk = [_read_jpeg(name, root, p) for p in paths[start : start + _RESIZE_CHUNK]]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(chunk):  # the official images are all 64x64; others may not be
            by_shape.setdefault(tuple(img.shape), []).append(i)
        for idx in by_shape.values():
            out[[start + i for i in idx]] = fit_size(torch.stack([chunk[i] for i in idx]), size)
    return out


def _decode_tiny(name: str, root: Path, spec: DatasetConfig) -> ImageArrays:
    """Train images and the labelled val split (the test split) at ``spec.image_size``."""
    idx = _tiny_index(name, root)
    out: list[Tensor] = []
    for split in (idx.train, idx.val):
        out += [_decode_images(name, root, [p for p, _ in split], spec.image_size),
                torch.tensor([c for _, c in split], dtype=torch.int64)]
    return ImageArrays(*out)


# ---------------------------------------------------------------------------- registry


def _fit(x: Tensor, size: int) -> Tensor:
    """:func:`fit_size` in chunks: uint8 ``(N, C, h, w)`` -> ``(N, C, size, size)``."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return torch.cat([fit_size(c, size) for c in x.split(_RESIZE_CHUNK)])


_CIFAR_LAYOUT = "{folder}/ holding {files} (the unpacked {archive} from {url})"

#: The paper's datasets by source name.
PAPER: dict[str, PaperDataset] = {
    "cifar10": PaperDataset(
        folder=_CIFAR["cifar10"].folder,
        layout=_CIFAR_LAYOUT.format(folder=_CIFAR["cifar10"].folder,
                                    files="data_batch_1..data_batch_5, test_batch, batches.meta",
                                    archive=_CIFAR["cifar10"].archive, url=_CIFAR["cifar10"].url),
        url=_CIFAR["cifar10"].url,
        fetch=_fetch_cifar,
        sources=lambda root: _cifar_sources("cifar10", root),
        decode=_decode_cifar,
    ),
    "cifar100": PaperDataset(
        folder=_CIFAR["cifar100"].folder,
        layout=_CIFAR_LAYOUT.format(folder=_CIFAR["cifar100"].folder, files="train, test, meta",
                                    archive=_CIFAR["cifar100"].archive,
                                    url=_CIFAR["cifar100"].url),
        url=_CIFAR["cifar100"].url,
        fetch=_fetch_cifar,
        sources=lambda root: _cifar_sources("cifar100", root),
        decode=_decode_cifar,
    ),
    "fashion_mnist": PaperDataset(
        folder=FMNIST_FOLDER,
        layout=f"{FMNIST_FOLDER}/ holding {', '.join(FMNIST_FILES[:3])} and {FMNIST_FILES[3]} "
               f"(or the same names with .gz, as served at {FMNIST_URL})",
        url=FMNIST_URL,
        fetch=_fetch_fmnist,
        sources=_fmnist_sources,
        decode=_decode_fmnist,
    ),
    "tiny_imagenet": PaperDataset(
        folder=TINY_FOLDER,
        layout=f"{TINY_FOLDER}/ holding wnids.txt, train/<wnid>/images/*.JPEG, "
               "val/images/*.JPEG and val/val_annotations.txt (filename, wnid, 4 bbox numbers, "
               f"tab-separated): the unpacked {TINY_ZIP} from {TINY_URL}",
        url=TINY_URL,
        fetch=_fetch_tiny,
        sources=_tiny_sources,
        decode=_decode_tiny,
    ),
}


def prepare(name: str, spec: DatasetConfig) -> tuple[ImageArrays, Path]:
    """Fetch, verify and decode ``name`` (or load its cache): the full splits at
    ``spec.image_size`` and the cache file's path."""
    ds = PAPER[name]
    root = data_root(spec)
    ds.fetch(name, root, spec)
    key = cache.source_key(ds.sources(root), root, spec.image_size)
    path = cache.cache_path(root, name, spec.image_size, key)
    arrays = cache.get_or_build(path, lambda: _decoded(ds, name, root, spec),
                                spec.verify_checksums)
    return arrays, path


def _decoded(ds: PaperDataset, name: str, root: Path, spec: DatasetConfig) -> ImageArrays:
    """``ds.decode`` plus the checks every cache must pass before it is written."""
    arrays = ds.decode(name, root, spec)
    for split, x, y in (("train", arrays.x_train, arrays.y_train),
                        ("test", arrays.x_test, arrays.y_test)):
        if len(x) != len(y) or len(y) == 0:
            raise DataError(f"{name}: the {split} split in {root / ds.folder} decodes to "
                            f"{len(x)} images and {len(y)} labels. Delete the folder and fetch "
                            f"it again with `{fetch_command(name, root)}`.")
    return arrays


def subsample(arrays: ImageArrays, spec: DatasetConfig) -> ImageArrays:
    """Keep ``spec.train_size``/``spec.test_size`` random images (None = all), seeded."""
    x_tr, y_tr = subsample_split(arrays.x_train, arrays.y_train, spec.train_size, spec.data_seed)
    x_te, y_te = subsample_split(arrays.x_test, arrays.y_test, spec.test_size, spec.data_seed + 1)
    return ImageArrays(x_tr, y_tr, x_te, y_te)


def load(name: str, spec: DatasetConfig) -> ImageArrays:
    """The source behind ``dataset=<name>``: :func:`prepare`, then :func:`subsample`."""
    arrays, _ = prepare(name, spec)
    return subsample(arrays, spec)
