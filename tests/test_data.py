"""The paper's four datasets: on-disk formats, the cache, the errors, the data command.

Fixtures are written in each format's exact layout by :mod:`datafiles` (tiny, and not
the official bytes, hence ``dataset.verify_checksums=false``). Training through the CLI
runs in subprocesses; everything else runs in-process.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from datafiles import TINY_COLOURS, WRITERS, write_cifar10, write_fashion_mnist
from omegaconf import OmegaConf

from flexexp.config import compose_config, register_configs
from flexexp.data import cache, paper
from flexexp.data.__main__ import main as data_main
from flexexp.data.sources import load_arrays
from flexexp.errors import DataError
from flexexp.schema import DatasetConfig

REPO = Path(__file__).resolve().parent.parent
NAMES = ["cifar10", "cifar100", "fashion_mnist", "tiny_imagenet"]
FETCH = "python -m flexexp.data download dataset={name} dataset.root={root}"


def spec_for(name: str, root: Path, *overrides: str, verify: bool = False,
             download: bool = False) -> DatasetConfig:
    """The real config's ``dataset`` section for ``dataset=name`` under ``root``."""
    over = [f"dataset={name}", f"dataset.root={root}", f"dataset.download={str(download).lower()}",
            f"dataset.verify_checksums={str(verify).lower()}", *overrides]
    return OmegaConf.to_object(compose_config(over).dataset)


def cache_files(root: Path) -> list[Path]:
    return sorted((root / cache.CACHE_DIR).glob("*.pt"))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.pop("FLEXEXP_DATA", None)
    return env


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    """All four datasets under one root, and what was written."""
    root = tmp_path_factory.mktemp("data")
    return root, {name: write(root) for name, write in WRITERS.items()}


@pytest.fixture
def offline(monkeypatch):
    """No network, wherever the test runs: every urlopen fails as a missing DNS does."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# ---------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_keeps_images_labels_and_shapes(written, name):
    root, files = written
    spec = spec_for(name, root)
    arrays = load_arrays(spec)
    w = files[name]
    c = 1 if name == "fashion_mnist" else 3
    for x, y, y_want in ((arrays.x_train, arrays.y_train, w.y_train),
                         (arrays.x_test, arrays.y_test, w.y_test)):
        assert x.dtype == torch.uint8 and tuple(x.shape) == (len(y_want), c, 32, 32)
        assert y.dtype == torch.int64
        assert torch.equal(y, torch.from_numpy(y_want))
        assert torch.equal(y.bincount(minlength=spec.num_classes),
                           torch.from_numpy(np.bincount(y_want, minlength=spec.num_classes)))
    if name in ("cifar10", "cifar100"):  # lossless: every pixel is back, in NCHW
        assert torch.equal(arrays.x_train, torch.from_numpy(w.x_train))
        assert torch.equal(arrays.x_test, torch.from_numpy(w.x_test))
    elif name == "fashion_mnist":  # 28x28 zero-padded to 32x32, pixels exact
        assert torch.equal(arrays.x_train[:, :, 2:30, 2:30], torch.from_numpy(w.x_train))
        assert torch.equal(arrays.x_test[:, :, 2:30, 2:30], torch.from_numpy(w.x_test))
        border = arrays.x_train.clone()
        border[:, :, 2:30, 2:30] = 0
        assert border.sum() == 0
    else:  # JPEG and 64 -> 32 resizing: each image keeps its class's colour
        # Lossy, and how lossy depends on the JPEG library, so the contract is the one a
        # label needs: every image's mean colour is nearer its own class's colour than any
        # other class's (the classes are >= 82 levels apart in some channel; JPEG at
        # quality 95 moves a flat image's mean by a few levels).
        palette = torch.tensor(TINY_COLOURS, dtype=torch.float64)
        for x, y in ((arrays.x_train, arrays.y_train), (arrays.x_test, arrays.y_test)):
            dist = torch.cdist(x.double().mean((2, 3)), palette)  # (N, classes)
            assert torch.equal(dist.argmin(1), y)


def test_subsample_is_seeded_and_sized(written):
    root, _ = written
    spec = spec_for("cifar10", root, "dataset.train_size=10", "dataset.test_size=5")
    a, b = load_arrays(spec), load_arrays(spec)
    assert len(a.y_train) == 10 and len(a.y_test) == 5
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


def test_image_size_resizes_and_keys_its_own_cache(tmp_path):
    write_cifar10(tmp_path)
    arrays = load_arrays(spec_for("cifar10", tmp_path, "dataset.image_size=16"))
    assert tuple(arrays.x_train.shape[1:]) == (3, 16, 16)
    load_arrays(spec_for("cifar10", tmp_path))
    assert [p.name.split("-")[1] for p in cache_files(tmp_path)] == ["16", "32"]


def test_root_defaults_to_env_var(monkeypatch, tmp_path):
    register_configs()
    for env, want in ((str(tmp_path), str(tmp_path)), (None, "data")):
        if env is None:
            monkeypatch.delenv("FLEXEXP_DATA", raising=False)
        else:
            monkeypatch.setenv("FLEXEXP_DATA", env)
        cfg = compose_config(["dataset=cifar10"])
        assert cfg.dataset.root == want and cfg.dataset.download is True
        assert cfg.dataset.verify_checksums is True


# ---------------------------------------------------------------------------- training CLI


def _train_cmd(name: str, root: Path, runs: Path) -> list[str]:
    return [sys.executable, "-m", "flexexp.train", f"dataset={name}", f"dataset.root={root}",
            "dataset.download=false", "dataset.verify_checksums=false", "trainer.epochs=1",
            "trainer.batch_size=16", "trainer.progress=false", "trainer.threads=1",
            f"paths.runs={runs}"]


@pytest.fixture(scope="module")
def cli(written, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every command-line test's process, started side by side (each costs seconds of
    imports): one epoch of each dataset, a run without data, a download command."""
    root, _ = written
    jobs: dict[str, tuple[list[str], Path]] = {}
    for name in NAMES:
        tmp = tmp_path_factory.mktemp(f"train-{name}")
        jobs[name] = (_train_cmd(name, root, tmp / "runs"), tmp)
    tmp = tmp_path_factory.mktemp("nodata")
    jobs["nodata"] = (_train_cmd("cifar10", tmp / "empty", tmp / "runs"), tmp)
    tmp = tmp_path_factory.mktemp("download")
    write_cifar10(tmp / "d")
    write_fashion_mnist(tmp / "d")
    jobs["download"] = ([sys.executable, "-m", "flexexp.data", "download",
                         "dataset=cifar10,fashion_mnist", f"dataset.root={tmp / 'd'}",
                         "dataset.verify_checksums=false"], tmp)

    def run(job: tuple[list[str], Path]) -> tuple[subprocess.CompletedProcess, Path]:
        cmd, cwd = job
        return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True,
                              timeout=300), cwd

    # as many at once as there are cores: more only makes them fight over the CPU
    with ThreadPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        return dict(zip(jobs, pool.map(run, jobs.values()), strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_train_one_epoch_through_the_cli(cli, name):
    proc, tmp = cli[name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = list((tmp / "runs").glob(f"{name}/**/result.json"))
    assert len(results) == 1
    record = json.loads(results[0].read_text())
    assert record["status"] == "completed" and record["dataset"] == name
    assert len(record["history"]) == 1


def test_cli_missing_data_exits_2_with_the_fix(cli):
    proc, tmp = cli["nodata"]
    empty = tmp / "empty"
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "cifar10" in proc.stderr and str(empty) in proc.stderr
    assert FETCH.format(name="cifar10", root=empty) in proc.stderr


def test_download_command_prepares_several_datasets(cli):
    proc, tmp = cli["download"]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(": ready,") == 2
    assert [p.name.split("-")[0] for p in cache_files(tmp / "d")] == ["cifar10", "fashion_mnist"]
    assert "cache built" in proc.stderr


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", NAMES)
def test_missing_data_names_dataset_path_and_command(tmp_path, name):
    with pytest.raises(DataError) as err:
        load_arrays(spec_for(name, tmp_path))
    msg = str(err.value)
    assert msg.startswith(f"{name}:") and "dataset.download=false" in msg
    assert str(tmp_path / paper.PAPER[name].folder) in msg
    assert FETCH.format(name=name, root=tmp_path) in msg
    assert "\n" not in msg


@pytest.mark.parametrize("name", NAMES)
def test_download_impossible_says_so_and_leaves_nothing(tmp_path, offline, name):
    with pytest.raises(DataError) as err:
        load_arrays(spec_for(name, tmp_path, download=True, verify=True))
    msg = str(err.value)
    assert msg.startswith(f"{name}: could not download {paper.PAPER[name].url}")
    assert "no network" in msg and "Temporary failure in name resolution" in msg
    assert f"{tmp_path}/{paper.PAPER[name].folder}" in msg  # where to put the files by hand
    assert "python -m flexexp.data download" in msg
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left in ([], [cache.CACHE_DIR])  # no partial archive or empty dataset folder
    assert cache_files(tmp_path) == []


@pytest.mark.parametrize("name, bad_file", [("cifar10", "data_batch_1"),
                                            ("cifar100", "train"),
                                            ("fashion_mnist", "train-images-idx3-ubyte")])
def test_checksums_are_verified_by_default(tmp_path, name, bad_file):
    WRITERS[name](tmp_path)
    with pytest.raises(DataError) as err:
        load_arrays(spec_for(name, tmp_path, verify=True))
    msg = str(err.value)
    bad = next(tmp_path.rglob(bad_file))
    # a readable file with other content: how to check it comes before any advice to
    # delete it, and the file stays where it was
    assert f"{bad} is not the official data: the MD5 of its content is {paper.md5_of(bad)}" in msg
    assert f"(check with `md5sum {bad}`)" in msg and "corrupt" not in msg
    assert "dataset.verify_checksums=false" in msg
    assert bad.is_file() and cache_files(tmp_path) == []


def test_verified_load_runs_torchvisions_checks(tmp_path, monkeypatch):
    """With the fixture's own MD5s in torchvision's class, verification passes."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import calculate_md5

    w = write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"

    def md5(f: str) -> str:
        return calculate_md5(str(folder / f))

    monkeypatch.setattr(CIFAR10, "train_list", [[f, md5(f)] for f, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[f, md5(f)] for f, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5("batches.meta")})
    arrays = load_arrays(spec_for("cifar10", tmp_path, verify=True))
    assert torch.equal(arrays.x_test, torch.from_numpy(w.x_test))
    (path,) = cache_files(tmp_path)
    assert torch.load(path, weights_only=True)["verified"] is True


def test_interrupted_download_leaves_no_partial_archive(tmp_path, monkeypatch):
    from torchvision.datasets import utils as tv_utils

    def half(url: str, filename: str, chunk_size: int = 0) -> None:
        Path(filename).write_bytes(b"PK\x03\x04 the first bytes of a zip")
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(tv_utils, "_get_redirect_url", lambda url, max_hops=3: url)
    monkeypatch.setattr(tv_utils, "_urlretrieve", half)
    with pytest.raises(DataError, match="connection reset by peer"):
        load_arrays(spec_for("tiny_imagenet", tmp_path, download=True))
    assert not (tmp_path / "tiny-imagenet-200.zip").exists()
    assert not (tmp_path / "tiny-imagenet-200").exists()


def test_unverified_cache_is_not_trusted_by_a_verifying_run(tmp_path):
    write_cifar10(tmp_path)
    load_arrays(spec_for("cifar10", tmp_path))  # builds a cache without the MD5 checks
    assert len(cache_files(tmp_path)) == 1
    with pytest.raises(DataError, match="is not the official data"):
        load_arrays(spec_for("cifar10", tmp_path, verify=True))


def test_truncated_cifar_batch_is_named(tmp_path):
    write_cifar10(tmp_path, per_batch=20)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(DataError) as err:
        load_arrays(spec_for("cifar10", tmp_path))
    msg = str(err.value)
    assert f"{bad} is corrupt or truncated" in msg
    assert FETCH.format(name="cifar10", root=tmp_path) in msg
    assert cache_files(tmp_path) == []  # nothing cached from a failed decode


def test_cifar_batch_with_wrong_shape_is_named(tmp_path):
    write_cifar10(tmp_path)
    import pickle

    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    entry = pickle.loads(bad.read_bytes())
    entry["labels"] = entry["labels"][:-1]  # one label short
    bad.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(DataError, match=f"{bad} is corrupt or truncated"):
        load_arrays(spec_for("cifar10", tmp_path))


def test_bad_gzip_is_named_and_not_half_unpacked(tmp_path):
    write_fashion_mnist(tmp_path, unpacked=False)
    raw = tmp_path / "FashionMNIST" / "raw"
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip data")
    with pytest.raises(DataError) as err:
        load_arrays(spec_for("fashion_mnist", tmp_path))
    assert f"{raw / 'train-labels-idx1-ubyte.gz'} is corrupt or truncated" in str(err.value)
    assert not (raw / "train-labels-idx1-ubyte").exists()
    assert cache_files(tmp_path) == []


def test_fashion_mnist_from_archives_only(tmp_path):
    w = write_fashion_mnist(tmp_path, unpacked=False)  # as copied by hand from the mirror
    arrays = load_arrays(spec_for("fashion_mnist", tmp_path))
    assert torch.equal(arrays.x_test[:, :, 2:30, 2:30], torch.from_numpy(w.x_test))


def _fixture_content_md5s(monkeypatch, tmp_path: Path) -> Path:
    """Fashion-MNIST fixture archives, with their content declared the official one."""
    write_fashion_mnist(tmp_path, unpacked=False)
    raw = tmp_path / "FashionMNIST" / "raw"
    monkeypatch.setattr(paper, "FMNIST_CONTENT_MD5", {
        f: paper.md5_of(raw / f"{f}.gz", unpack=True) for f in paper.FMNIST_FILES})
    return raw


def test_fashion_mnist_is_checked_by_content_not_by_archive(tmp_path, monkeypatch):
    """A recompressed archive (as Debian's package ships) with the official content is
    accepted; a changed byte in it is reported with the command that checks it."""
    raw = _fixture_content_md5s(monkeypatch, tmp_path)
    labels = raw / "t10k-labels-idx1-ubyte.gz"
    content = gzip.decompress(labels.read_bytes())
    labels.write_bytes(gzip.compress(content, compresslevel=1, mtime=12345))  # other bytes
    arrays = load_arrays(spec_for("fashion_mnist", tmp_path, verify=True))
    assert len(arrays.y_test) == 20
    # the unpacked file is checked again (by content) when the cache is built
    (tmp_path / cache.CACHE_DIR).rename(tmp_path / "old-cache")
    unpacked = raw / "t10k-labels-idx1-ubyte"
    unpacked.write_bytes(content[:-1] + bytes([(content[-1] + 1) % 10]))
    with pytest.raises(DataError) as err:
        load_arrays(spec_for("fashion_mnist", tmp_path, verify=True))
    msg = str(err.value)
    want = paper.FMNIST_CONTENT_MD5["t10k-labels-idx1-ubyte"]
    assert f"{unpacked} is not the official data" in msg and f"the official one is {want}" in msg
    assert f"md5sum {unpacked}" in msg and unpacked.exists()
    # an archive whose unpacked content differs: checked with gunzip -c, before unpacking
    unpacked.unlink()
    labels.write_bytes(gzip.compress(content[:-1] + b"\x07"))
    with pytest.raises(DataError) as err:
        load_arrays(spec_for("fashion_mnist", tmp_path, verify=True))
    assert f"gunzip -c {labels} | md5sum" in str(err.value) and not unpacked.exists()


def test_fashion_mnist_download_copies_the_system_package(tmp_path, monkeypatch, offline,
                                                         capsys, caplog):
    caplog.set_level(logging.INFO, logger="flexexp")
    system = tmp_path / "usr-share"
    _fixture_content_md5s(monkeypatch, system)
    for gz in (system / "FashionMNIST" / "raw").iterdir():
        gz.rename(system / gz.name)
    monkeypatch.setattr(paper, "FMNIST_SYSTEM_DIR", system)
    root = tmp_path / "data"
    # without a download, the error says the package is there and how to use it
    with pytest.raises(DataError) as err:
        load_arrays(spec_for("fashion_mnist", root, verify=True))
    assert f"the download command copies its files from {system}/" in str(err.value)
    assert data_main(["download", "dataset=fashion_mnist", f"dataset.root={root}"]) == 0
    out = capsys.readouterr()
    assert f"copied {root / paper.FMNIST_FOLDER / 'train-images-idx3-ubyte.gz'} from " \
           f"{system / 'train-images-idx3-ubyte.gz'} (package dataset-fashion-mnist)" in caplog.text
    assert "fashion_mnist: ready, 30 train / 20 test images" in out.out
    # the offline fixture refuses any network access: nothing but the copy was used
    assert sorted(p.name for p in (root / paper.FMNIST_FOLDER).iterdir()) == sorted(
        [*paper.FMNIST_FILES, *(f"{f}.gz" for f in paper.FMNIST_FILES)])


def test_missing_fashion_mnist_names_the_system_package(tmp_path, monkeypatch):
    monkeypatch.setattr(paper, "FMNIST_SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError) as err:
        load_arrays(spec_for("fashion_mnist", tmp_path))
    msg = str(err.value)
    assert FETCH.format(name="fashion_mnist", root=tmp_path) in msg
    assert "`apt-get install dataset-fashion-mnist`" in msg and "Debian/Ubuntu" in msg


def test_truncated_idx_file_is_named(tmp_path):
    write_fashion_mnist(tmp_path)
    bad = tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(DataError, match=f"{bad} is corrupt or truncated"):
        load_arrays(spec_for("fashion_mnist", tmp_path))
    assert cache_files(tmp_path) == []


def test_unreadable_jpeg_is_named(tmp_path):
    w = WRITERS["tiny_imagenet"](tmp_path)
    bad = w.train_files[7]
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError) as err:
        load_arrays(spec_for("tiny_imagenet", tmp_path))
    assert f"{bad} is corrupt or truncated (unreadable image" in str(err.value)
    assert cache_files(tmp_path) == []


@pytest.mark.parametrize("remove", ["wnids.txt", "val/val_annotations.txt"])
def test_tiny_imagenet_wrong_layout(tmp_path, remove):
    WRITERS["tiny_imagenet"](tmp_path)
    (tmp_path / "tiny-imagenet-200" / remove).unlink()
    with pytest.raises(DataError) as err:
        load_arrays(spec_for("tiny_imagenet", tmp_path, download=True))
    msg = str(err.value)
    assert "does not have the official layout" in msg and f"{remove} is missing" in msg
    assert str(tmp_path / "tiny-imagenet-200") in msg and "wnids.txt" in msg


def test_tiny_imagenet_unknown_wnid_in_annotations(tmp_path):
    WRITERS["tiny_imagenet"](tmp_path)
    ann = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_99.JPEG\tn00000000\t0\t0\t63\t63\n")
    with pytest.raises(DataError, match=r"val_annotations.txt is corrupt .*line 21"):
        load_arrays(spec_for("tiny_imagenet", tmp_path))


# ---------------------------------------------------------------------------- cache


def _no_decode(monkeypatch, name: str) -> None:
    def boom(*args):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setitem(paper.PAPER, name, dataclasses.replace(paper.PAPER[name], decode=boom))


def test_second_load_hits_the_cache(tmp_path, monkeypatch, caplog):
    write_cifar10(tmp_path)
    spec = spec_for("cifar10", tmp_path)
    with caplog.at_level(logging.INFO, logger="flexexp.data"):
        first = load_arrays(spec)
        _no_decode(monkeypatch, "cifar10")
        second = load_arrays(spec)
    messages = [r.getMessage() for r in caplog.records if r.name == "flexexp.data.cache"]
    assert messages[0].startswith("cache built") and messages[1].startswith("cache hit")
    assert torch.equal(first.x_train, second.x_train)
    assert torch.equal(first.y_test, second.y_test)


def test_changed_source_files_rebuild_the_cache(tmp_path, caplog):
    write_cifar10(tmp_path)
    spec = spec_for("cifar10", tmp_path)
    load_arrays(spec)
    old = cache_files(tmp_path)
    time.sleep(0.01)  # a distinct mtime even on coarse clocks
    w = write_cifar10(tmp_path, seed=7)
    with caplog.at_level(logging.INFO, logger="flexexp.data"):
        arrays = load_arrays(spec)
    assert any(r.getMessage().startswith("cache built") for r in caplog.records)
    assert torch.equal(arrays.x_train, torch.from_numpy(w.x_train))
    new = cache_files(tmp_path)
    assert len(new) == 1 and new != old  # the stale cache is gone


def test_damaged_cache_is_rebuilt(tmp_path, caplog):
    w = write_cifar10(tmp_path)
    spec = spec_for("cifar10", tmp_path)
    load_arrays(spec)
    (path,) = cache_files(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.INFO, logger="flexexp.data"):
        arrays = load_arrays(spec)
    assert any("ignoring unreadable cache" in r.getMessage() for r in caplog.records)
    assert torch.equal(arrays.x_test, torch.from_numpy(w.x_test))


def test_concurrent_builds_do_not_corrupt_the_cache(tmp_path, caplog):
    w = write_cifar10(tmp_path, per_batch=40)
    spec = spec_for("cifar10", tmp_path)
    results, errors = [], []

    def run() -> None:
        try:
            results.append(load_arrays(spec))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    with caplog.at_level(logging.INFO, logger="flexexp.data"):
        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and len(results) == 4
    for arrays in results:
        assert torch.equal(arrays.x_train, torch.from_numpy(w.x_train))
    built = [r for r in caplog.records if r.getMessage().startswith("cache built")]
    assert len(built) == 1  # the others waited for the lock and hit the cache
    assert len(cache_files(tmp_path)) == 1
    assert not list((tmp_path / cache.CACHE_DIR).glob("*.tmp"))
    assert cache.read(cache_files(tmp_path)[0], need_verified=False) is not None


def test_cache_on_5000_images_is_faster_than_decoding(tmp_path, monkeypatch, capsys):
    """Decode vs cache hit on a 5,000-image CIFAR-10 (4,000 train / 1,000 test)."""
    write_cifar10(tmp_path, per_batch=800, n_test=1000)
    spec = spec_for("cifar10", tmp_path)
    t0 = time.perf_counter()
    built = load_arrays(spec)
    t_build = time.perf_counter() - t0
    _no_decode(monkeypatch, "cifar10")
    t0 = time.perf_counter()
    hit = load_arrays(spec)
    t_hit = time.perf_counter() - t0
    assert len(hit.y_train) == 4000 and len(hit.y_test) == 1000
    assert torch.equal(built.x_train, hit.x_train)
    with capsys.disabled():
        print(f"\n[cache timing] 5,000 CIFAR images: decode+write {t_build:.3f} s, "
              f"cache hit {t_hit:.3f} s")


# ---------------------------------------------------------------------------- data command


def test_info_command_prints_shapes_and_cache(written, capsys):
    root, _ = written
    assert data_main(["info", "dataset=fashion_mnist", f"dataset.root={root}",
                      "dataset.verify_checksums=false"]) == 0
    out = capsys.readouterr().out
    assert "fashion_mnist" in out and "10 classes" in out
    assert "x (30, 1, 32, 32) uint8" in out and "x (20, 1, 32, 32)" in out
    assert str(root / cache.CACHE_DIR) in out


def test_info_command_does_not_download(tmp_path, capsys):
    assert data_main(["info", "dataset=cifar100", f"dataset.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cifar100: no data at")
    assert FETCH.format(name="cifar100", root=tmp_path) in err


def test_download_command_offline_exits_2_for_each(tmp_path, offline, capsys):
    assert data_main(["download", "dataset=all", f"dataset.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    for name in NAMES:
        assert f"error: {name}: could not download" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("args, expect", [
    (["download"], "name the datasets"),
    (["download", "dataset=cifar1000"], "Did you mean 'cifar100'"),
    (["fetch", "dataset=cifar10"], "usage: python -m flexexp.data download"),
])
def test_data_command_usage_errors(args, expect, capsys):
    assert data_main(args) == 2
    assert expect in capsys.readouterr().err


def test_download_command_for_generated_data(capsys):
    assert data_main(["download", "dataset=digits"]) == 0
    assert "nothing to download" in capsys.readouterr().out


def test_file_names_match_torchvision():
    """paper.py names the files itself, to import torchvision only when it must."""
    from torchvision.datasets import CIFAR10, CIFAR100, FashionMNIST

    for name, cls in (("cifar10", CIFAR10), ("cifar100", CIFAR100)):
        files = paper._CIFAR[name]
        assert files.folder == cls.base_folder and files.url == cls.url
        assert files.archive == cls.filename and files.meta == cls.meta["filename"]
        assert list(files.batches) == [f for f, _ in cls.train_list + cls.test_list]
    assert [f"{f}.gz" for f in paper.FMNIST_FILES] == [f for f, _ in FashionMNIST.resources]
    assert paper.FMNIST_URL == FashionMNIST.mirrors[0]
    assert paper.FMNIST_FOLDER == f"{FashionMNIST.__name__}/raw"


def test_fixture_tree_matches_the_official_layout(written):
    root, _ = written
    names = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    for need in ["cifar-10-batches-py/data_batch_5", "cifar-10-batches-py/batches.meta",
                 "cifar-100-python/meta", "FashionMNIST/raw/t10k-labels-idx1-ubyte.gz",
                 "FashionMNIST/raw/t10k-labels-idx1-ubyte", "tiny-imagenet-200/wnids.txt",
                 "tiny-imagenet-200/val/val_annotations.txt"]:
        assert need in names
    assert any(n.startswith("tiny-imagenet-200/train/n01443537/images/") for n in names)


# ---------------------------------------------------------------------------- validation split


def _numbered(n: int, classes: int):
    """Training images that carry their own index (two pixels: high and low byte), labels
    ``i * 7 % classes`` (uneven class sizes), and a small test split."""
    from flexexp.data import sources

    idx = torch.arange(n)
    x = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = (idx // 256).to(torch.uint8), (idx % 256).to(torch.uint8)
    y = (idx * 7 + idx // 5) % classes
    return sources.ImageArrays(x, y, x[:10].clone(), y[:10].clone())


def _index(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long()


def test_validation_split_is_stratified_disjoint_and_keeps_the_order():
    from flexexp.data.sources import split_validation

    full = _numbered(1000, 7)
    out = split_validation(full, 0.15, data_seed=3)
    kept, held = _index(out.x_train), _index(out.x_val)
    # every training image is in exactly one part, and each part keeps the original order
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(1000))
    assert not set(kept.tolist()) & set(held.tolist())
    assert torch.equal(kept, kept.sort().values) and torch.equal(held, held.sort().values)
    assert torch.equal(out.y_train, full.y_train[kept])
    assert torch.equal(out.y_val, full.y_train[held])
    # stratified: each class gives round(fraction * its images)
    for c in range(7):
        n_c = int((full.y_train == c).sum())
        assert int((out.y_val == c).sum()) == round(0.15 * n_c), c
    assert out.x_test is full.x_test and out.y_test is full.y_test


def test_validation_split_depends_on_the_data_seed_alone():
    from flexexp.data.sources import split_validation

    full = _numbered(600, 5)
    a = split_validation(full, 0.2, data_seed=0)
    b = split_validation(full, 0.2, data_seed=0)
    c = split_validation(full, 0.2, data_seed=1)
    assert torch.equal(_index(a.x_val), _index(b.x_val))
    assert not torch.equal(_index(a.x_val), _index(c.x_val))
    # the run's seed is not part of the dataset spec: every seed of a grid loads the same
    specs = [OmegaConf.to_object(compose_config(["dataset.val_fraction=0.1", f"seed={s}"])
                                 .dataset) for s in (0, 7)]
    x0, x7 = load_arrays(specs[0]), load_arrays(specs[1])
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(x0, name), getattr(x7, name)), name


@pytest.mark.parametrize("source", ["digits", "synthetic"])
def test_no_validation_split_loads_the_same_arrays_as_before(source):
    from flexexp.data import sources

    spec = OmegaConf.to_object(compose_config([f"dataset={source}"]).dataset)
    assert spec.val_fraction == 0
    raw = sources.DATASETS[source](spec)  # the source itself: the arrays every run had
    got = load_arrays(spec)
    assert got.x_val is None and got.y_val is None
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(got, name), getattr(raw, name)), name
    assert sources.fingerprint(got) == sources.fingerprint(raw)
    held = load_arrays(dataclasses.replace(spec, val_fraction=0.1))
    assert sources.fingerprint(held) != sources.fingerprint(got)  # the split is in it
    assert len(held.y_train) + len(held.y_val) == len(raw.y_train)


@pytest.mark.parametrize("fraction,what", [(0.001, "no validation image"),
                                           (0.999, "no training image")])
def test_a_split_that_empties_a_class_is_refused(fraction, what):
    from flexexp.errors import ConfigError

    spec = OmegaConf.to_object(compose_config([f"dataset.val_fraction={fraction}"]).dataset)
    with pytest.raises(ConfigError, match=rf"dataset.val_fraction={fraction} of class 0's "
                                          rf"\d+ training images leaves {what}"):
        load_arrays(spec)


@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_val_fraction_outside_its_range_is_refused(value):
    from flexexp.config import validate
    from flexexp.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"dataset.val_fraction={value} is outside its "
                                          r"range \[0, 1\)"):
        validate(compose_config([f"dataset.val_fraction={value}"]))
