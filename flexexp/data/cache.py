"""Decoded datasets cached as uint8 tensors next to the data.

Decoding a paper dataset (unpickling CIFAR, parsing IDX files, decoding 110,000 JPEGs)
costs seconds to a minute; loading the same images from one ``torch.save`` file costs a
fraction of a second. The cache lives in ``<dataset.root>/flexexp-cache/`` as
``<dataset>-<image_size>-<key>.pt``: a dict of ``x_train``/``x_test`` uint8
``(N, C, S, S)`` and ``y_train``/``y_test`` int64 ``(N,)`` at the configured image size,
before any subsampling. The key hashes the source files' names, sizes and mtimes, the
image size and :data:`FORMAT_VERSION`, so changed data or a new format rebuilds it.

Files are written through :func:`flexexp.tracking.atomic_write_bytes` (temporary file,
then rename; the file gets the mode the user's umask gives, so others may share the
data): a reader sees a whole cache or none, and runs that build the same cache at
once cannot corrupt it. A lock file makes such runs wait for one builder instead of all
decoding the same data.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from flexexp.data.sources import ImageArrays
from flexexp.tracking import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "CACHE_DIR", "source_key", "cache_path", "read", "write",
           "file_lock", "get_or_build"]

#: Bump when the decoding changes what a cache holds: old caches are then stale.
FORMAT_VERSION = 1
#: Folder under ``dataset.root`` that holds the caches.
CACHE_DIR = "flexexp-cache"
_SPLITS = ("x_train", "y_train", "x_test", "y_test")


def source_key(files: Iterable[str | Path], base: Path, image_size: int) -> str:
    """Twelve hex digits naming the state of ``files`` (paths relative to ``base``).

    Names, sizes and modification times stand in for the content: hashing 100,000
    JPEGs on every run would cost more than the cache saves.
    """
    h = hashlib.sha1(f"v{FORMAT_VERSION}|size{image_size}".encode())
    cut = len(os.fspath(base)) + 1
    parts = []
    for path in files:  # plain strings and os.stat: Path methods cost more than the stat
        name = os.fspath(path)
        st = os.stat(name)
        parts.append(f"|{name[cut:]}:{st.st_size}:{st.st_mtime_ns}")
    h.update("".join(parts).encode())
    return h.hexdigest()[:12]


def cache_path(root: Path, dataset: str, image_size: int, key: str) -> Path:
    """``<root>/flexexp-cache/<dataset>-<image_size>-<key>.pt``."""
    return root / CACHE_DIR / f"{dataset}-{image_size}-{key}.pt"


def read(path: Path, need_verified: bool) -> ImageArrays | None:
    """The cached arrays at ``path``, or None if it is missing, unreadable or not good enough.

    A cache built with ``dataset.verify_checksums=false`` is not trusted by a run that
    asks for verified data (``need_verified``): that run rebuilds it with the checks.
    """
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        arrays = ImageArrays(*(blob[k] for k in _SPLITS))
        verified = bool(blob["verified"])
        fmt = int(blob["format"])
    except Exception as exc:  # any damage means "rebuild", never "fail the run"
        log.warning("ignoring unreadable cache %s (%s); rebuilding it", path, exc)
        return None
    if fmt != FORMAT_VERSION or (need_verified and not verified):
        return None
    return arrays


def write(path: Path, arrays: ImageArrays, verified: bool) -> bool:
    """Save ``arrays`` atomically at ``path`` and drop older caches of the same dataset and
    size; returns False (with a warning) where the folder is not writable.
    """
    blob = {k: getattr(arrays, k).contiguous() for k in _SPLITS}
    blob.update(verified=verified, format=FORMAT_VERSION)
    buf = io.BytesIO()
    torch.save(blob, buf)
    try:
        atomic_write_bytes(path, buf.getbuffer())
    except OSError as exc:  # a read-only data folder still trains, only without a cache
        log.warning("could not write the cache %s (%s); decoding again next run", path, exc)
        return False
    prefix = path.name.rsplit("-", 1)[0] + "-"
    for old in path.parent.glob(f"{prefix}*.pt"):
        if old != path:
            with contextlib.suppress(OSError):
                old.unlink()
    return True


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the block.

    Where locking is impossible (no ``fcntl``, a read-only folder, a file system without
    locks) the block runs unlocked: atomic writes still keep every file whole.
    """
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing releases the lock


def get_or_build(path: Path, build: Callable[[], ImageArrays], verified: bool) -> ImageArrays:
    """The arrays cached at ``path``, building and saving them with ``build()`` on a miss.

    ``verified`` says whether ``build`` checks checksums (``dataset.verify_checksums``).
    Logs whether the cache was hit or built and how long that took. ``build`` runs to
    the end before anything is written, so a failed decode leaves no cache behind.
    """
    t0 = time.perf_counter()
    arrays = read(path, need_verified=verified)
    if arrays is None:
        with file_lock(path.parent / f".{path.name.rsplit('-', 1)[0]}.lock"):
            # another run may have built it while this one waited for the lock
            arrays = read(path, need_verified=verified)
            if arrays is None:
                arrays = build()
                written = write(path, arrays, verified)
                log.info("cache %s %s in %.2f s (%d train / %d test images)",
                         "built" if written else "not written; decoded", path,
                         time.perf_counter() - t0, len(arrays.y_train), len(arrays.y_test))
                return arrays
    log.info("cache hit %s: loaded in %.2f s (%d train / %d test images)", path,
             time.perf_counter() - t0, len(arrays.y_train), len(arrays.y_test))
    return arrays
