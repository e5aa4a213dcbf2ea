"""The failure catalogue, class 2 (report integrity) and class 6 (files and disks); the
other classes are in tests/test_failures.py."""

from __future__ import annotations

import builtins
import errno
import io
import json
import math
import os
import stat
from pathlib import Path

import pandas as pd
import pytest
from datafiles import WRITERS, write_cifar10, write_fashion_mnist
from test_data import cache_files, spec_for
from test_report import write_record

from flexexp import files
from flexexp.data.sources import load_arrays
from flexexp.errors import DataError
from flexexp.report import main, report


def _skipped(tmp_path: Path, capsys, **bad) -> str:
    """Write one good AvgPool run and one whose record has ``bad`` values; run the report;
    assert it read the good run only; return the warnings it printed."""
    runs = tmp_path / "runs"
    write_record(runs, "cifar10", "avg", False, 0, 90.0)
    d = write_record(runs, "cifar10", "avg", False, 1, 50.0)
    rec = json.loads((d / "result.json").read_text()) | bad
    (d / "result.json").write_text(json.dumps(rec))
    assert main([f"paths.runs={runs}", f"out_dir={tmp_path / 'out'}"]) == 0
    err = capsys.readouterr().err
    row = pd.read_csv(tmp_path / "out" / "table1.csv").set_index(["dataset", "variant"])
    assert row.loc[("cifar10", "avg"), "n"] == 1 and row.loc[("cifar10", "avg"), "mean"] == 90.0
    assert f"warning: skipping {d / 'result.json'}" in err and "Traceback" not in err
    return err


# ---------------------------------------------------------------------------- 2. report integrity


def test_report_skips_a_record_whose_test_acc_is_250(tmp_path, capsys):
    assert "test_acc is 250.0, not an accuracy in [0, 100]" in _skipped(tmp_path, capsys,
                                                                        test_acc=250.0)


def test_report_skips_a_record_whose_test_acc_is_negative(tmp_path, capsys):
    assert "test_acc is -1.0" in _skipped(tmp_path, capsys, test_acc=-1.0)


def test_report_skips_a_record_whose_test_acc_is_nan(tmp_path, capsys):
    assert "test_acc is nan" in _skipped(tmp_path, capsys, test_acc=math.nan)  # JSON NaN


def test_report_skips_a_record_whose_test_acc_is_infinite(tmp_path, capsys):
    assert "test_acc is inf" in _skipped(tmp_path, capsys, test_acc=math.inf)


def test_report_skips_a_record_whose_test_acc_is_a_string(tmp_path, capsys):
    assert "test_acc is '91.2'" in _skipped(tmp_path, capsys, test_acc="91.2")


def test_report_skips_a_record_whose_test_acc_is_true(tmp_path, capsys):
    assert "test_acc is True" in _skipped(tmp_path, capsys, test_acc=True)


def test_report_skips_a_completed_record_without_test_acc(tmp_path, capsys):
    assert "completed but test_acc is missing" in _skipped(tmp_path, capsys, test_acc=None)


def test_report_skips_a_record_whose_seed_is_the_string_0(tmp_path, capsys):
    assert "seed is '0', not an integer" in _skipped(tmp_path, capsys, seed="0")


def test_report_skips_a_record_whose_seed_is_a_bool(tmp_path, capsys):
    assert "seed is True, not an integer" in _skipped(tmp_path, capsys, seed=True)


def test_report_skips_a_record_whose_seed_is_a_float(tmp_path, capsys):
    assert "seed is 1.5, not an integer" in _skipped(tmp_path, capsys, seed=1.5)


def test_report_skips_a_record_whose_sac_is_the_string_false(tmp_path, capsys):
    assert "sac is 'false', not true or false" in _skipped(tmp_path, capsys, sac="false")


def test_report_skips_a_record_whose_dataset_is_a_number(tmp_path, capsys):
    assert "dataset is 10, not a name" in _skipped(tmp_path, capsys, dataset=10)


def test_report_skips_a_record_whose_pool_is_null(tmp_path, capsys):
    assert "pool is None, not a name" in _skipped(tmp_path, capsys, pool=None)


def test_report_skips_a_record_whose_status_is_not_a_string(tmp_path, capsys):
    assert "status is 1, not a name" in _skipped(tmp_path, capsys, status=1)


def test_report_skips_a_record_whose_epochs_is_zero(tmp_path, capsys):
    assert "epochs is 0, not a positive integer" in _skipped(tmp_path, capsys, epochs=0)


def test_report_skips_a_record_whose_epochs_is_a_string(tmp_path, capsys):
    assert "epochs is '100', not a positive integer" in _skipped(tmp_path, capsys, epochs="100")


def test_report_skips_a_record_whose_config_is_a_list(tmp_path, capsys):
    assert "config is [], not a JSON object" in _skipped(tmp_path, capsys, config=[])


def _four_epochs_against_one(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    for seed in range(3):
        write_record(runs, "cifar10", "avg", False, seed, 40.0 + seed, epochs=1)
        write_record(runs, "cifar10", "flex", False, seed, 60.0 + seed, epochs=4)
    return runs


def test_report_does_not_pair_flexpool_4_epochs_with_avgpool_1_epoch(tmp_path):
    runs = _four_epochs_against_one(tmp_path)
    with pytest.warns(UserWarning, match=r"cifar10/flex/sac=False: its runs differ from avg's "
                                         r"in trainer.epochs"):
        out = report(runs, tmp_path / "out")
    sig = pd.read_csv(tmp_path / "out" / "significance1.csv").set_index("variant").loc["flex"]
    assert sig.n_pairs == 0 and sig.note == "not comparable: differs in trainer.epochs"
    assert all(math.isnan(sig[c]) for c in ("mean_diff", "ci95_low", "ci95_high", "p_value"))
    assert not sig.significant
    assert "| CIFAR10 | FlexPool | 0 |  |  |  | not comparable: differs in trainer.epochs |" \
        in (tmp_path / "out" / "table1.md").read_text()
    t1 = out["table1"].set_index(["dataset", "variant"])  # both rows stay, each of one config
    assert t1.loc[("cifar10", "avg")].n == 3 and t1.loc[("cifar10", "flex")].n == 3


def test_report_names_the_differing_key_on_the_command_line(tmp_path, capsys):
    runs = _four_epochs_against_one(tmp_path)
    assert main([f"paths.runs={runs}", f"out_dir={tmp_path / 'out'}"]) == 0
    err = capsys.readouterr().err
    assert "warning: cifar10/flex/sac=False: its runs differ from avg's in trainer.epochs, " \
           "not only in the pool and the seed" in err


def test_report_pairs_runs_that_differ_only_in_pool_and_seed(tmp_path, recwarn):
    runs = tmp_path / "runs"
    for seed in range(3):
        write_record(runs, "cifar10", "avg", False, seed, 40.0 + seed)
        write_record(runs, "cifar10", "flex", False, seed, 42.0 + seed)
    report(runs, tmp_path / "out")
    assert not [w for w in recwarn if "not comparable" in str(w.message)
                or "differ from" in str(w.message)]
    sig = pd.read_csv(tmp_path / "out" / "significance1.csv").set_index("variant").loc["flex"]
    assert sig.n_pairs == 3 and sig.mean_diff == 2.0 and pd.isna(sig.note)  # small integers


def test_report_onto_a_full_disk_keeps_the_previous_tables(tmp_path, capsys, monkeypatch):
    runs, out = tmp_path / "runs", tmp_path / "out"
    write_record(runs, "cifar10", "avg", False, 0, 90.0)
    assert main([f"paths.runs={runs}", f"out_dir={out}"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_record(runs, "cifar10", "avg", False, 1, 80.0)  # new data: every table would change
    calls = {"n": 0}
    real_fsync = os.fsync

    def full_after_two(fd):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_after_two)
    capsys.readouterr()
    assert main([f"paths.runs={runs}", f"out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the report into {out} (No space left on device" in err
    assert "the previous tables there are unchanged" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no mix, no leftovers


def test_report_into_an_out_dir_that_is_a_file_exits_2(tmp_path, capsys):
    write_record(tmp_path / "runs", "cifar10", "avg", False, 0, 90.0)
    (tmp_path / "out").write_text("my notes")
    assert main([f"paths.runs={tmp_path / 'runs'}", f"out_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert f"error: out_dir={tmp_path / 'out'} is a file, not a folder" in err
    assert (tmp_path / "out").read_text() == "my notes"


def test_report_into_an_out_dir_it_may_not_write_exits_2(tmp_path, capsys, monkeypatch):
    import tempfile

    write_record(tmp_path / "runs", "cifar10", "avg", False, 0, 90.0)
    (tmp_path / "out").mkdir()

    def denied(*args, **kwargs):  # what mkdtemp raises in a folder without write permission
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "out" / "x"))

    monkeypatch.setattr(tempfile, "mkdtemp", denied)  # tests may run as root: simulate
    assert main([f"paths.runs={tmp_path / 'runs'}", f"out_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the report into {tmp_path / 'out'} (Permission denied" in err
    assert "make the folder writable or choose out_dir=DIR" in err and "Traceback" not in err


def test_report_with_paths_runs_a_file_exits_2(tmp_path, capsys):
    (tmp_path / "runs").write_text("")
    assert main([f"paths.runs={tmp_path / 'runs'}", f"out_dir={tmp_path / 'out'}"]) == 2
    assert f"paths.runs={tmp_path / 'runs'} is a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _one_bad_file(tmp_path: Path, capsys, make) -> str:
    runs = tmp_path / "runs"
    write_record(runs, "cifar10", "avg", False, 0, 90.0)
    bad = runs / "cifar10" / "avg" / "sac_off" / "seed1" / "result.json"
    bad.parent.mkdir(parents=True)
    make(bad)
    assert main([f"paths.runs={runs}", f"out_dir={tmp_path / 'out'}"]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping {bad}:" in err and "Traceback" not in err
    assert pd.read_csv(tmp_path / "out" / "runs.csv").run_dir.tolist() == [
        str(runs / "cifar10" / "avg" / "sac_off" / "seed0-00000064")]
    return err


def test_report_skips_a_result_json_that_is_a_folder(tmp_path, capsys):
    assert "a folder named result.json, not a record" in _one_bad_file(
        tmp_path, capsys, lambda p: p.mkdir())


def test_report_skips_a_result_json_that_is_a_json_list(tmp_path, capsys):
    assert "not a JSON object but a JSON list" in _one_bad_file(
        tmp_path, capsys, lambda p: p.write_text("[1, 2]"))


def test_report_skips_a_result_json_that_is_not_utf8(tmp_path, capsys):
    assert "not UTF-8 text" in _one_bad_file(
        tmp_path, capsys, lambda p: p.write_bytes(b'{"dataset": "\xff\xfe"}'))


def test_report_skips_a_result_json_it_may_not_read(tmp_path, capsys, monkeypatch):
    real = Path.read_bytes

    def denied(self):  # chmod 000 does not stop root: simulate what a user would get
        if self.name == "result.json" and self.parent.name == "seed1":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert "not readable by this user (Permission denied)" in _one_bad_file(
        tmp_path, capsys, lambda p: p.write_text("{}"))


# ---------------------------------------------------------------------------- 6. files and disks


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_written_files_get_the_umask_mode_not_0600(tmp_path):
    files.write_json(tmp_path / "result.json", {"a": 1})
    files.atomic_write_bytes(tmp_path / "last.pt", b"x")
    want = 0o666 & ~_umask()
    assert files.FILE_MODE == want
    for name in ("result.json", "last.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    files.write_json(path, {"status": "running"})

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as err:
        files.write_json(path, {"status": "completed"})
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert str(err.value) == f"[Errno {errno.ENOSPC}] No space left on device: '{path}'"
    assert json.loads(path.read_text()) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left


def _deny_reading(monkeypatch, bad: Path) -> None:
    """``open(bad)`` fails as it does for a user without read permission (tests may run as
    root, where chmod 000 does not stop reads)."""
    real = builtins.open

    def guarded(file, *args, **kwargs):
        if isinstance(file, str | os.PathLike) and os.fspath(file) == str(bad):
            raise PermissionError(errno.EACCES, "Permission denied", str(bad))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)  # what Path.read_text calls


def _assert_unreadable_message(msg: str, bad: Path) -> None:
    assert f"cannot access {bad}: this user may not read or write it (Permission denied)" in msg
    assert "corrupt" not in msg and "do not delete it" in msg and "chmod" in msg


def test_an_unreadable_cifar_batch_is_not_called_corrupt(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    _deny_reading(monkeypatch, bad)
    with pytest.raises(DataError) as err:
        load_arrays(spec_for("cifar10", tmp_path))
    _assert_unreadable_message(str(err.value), bad)
    assert bad.exists() and cache_files(tmp_path) == []


@pytest.mark.parametrize("unpacked,name", [(True, "t10k-labels-idx1-ubyte"),
                                           (False, "train-images-idx3-ubyte.gz")])
def test_an_unreadable_fashion_mnist_file_is_not_called_corrupt(tmp_path, monkeypatch,
                                                                unpacked, name):
    write_fashion_mnist(tmp_path, unpacked=unpacked)  # a raw file, or a .gz archive
    bad = tmp_path / "FashionMNIST" / "raw" / name
    _deny_reading(monkeypatch, bad)
    with pytest.raises(DataError) as err:
        load_arrays(spec_for("fashion_mnist", tmp_path))
    _assert_unreadable_message(str(err.value), bad)


def test_an_unreadable_tiny_imagenet_image_is_not_called_corrupt(tmp_path, monkeypatch):
    bad = WRITERS["tiny_imagenet"](tmp_path).train_files[3]
    _deny_reading(monkeypatch, bad)
    with pytest.raises(DataError) as err:
        load_arrays(spec_for("tiny_imagenet", tmp_path))
    _assert_unreadable_message(str(err.value), bad)


def test_an_unreadable_tiny_imagenet_listing_is_not_called_a_bad_layout(tmp_path, monkeypatch):
    WRITERS["tiny_imagenet"](tmp_path)
    bad = tmp_path / "tiny-imagenet-200" / "wnids.txt"
    _deny_reading(monkeypatch, bad)
    with pytest.raises(DataError) as err:
        load_arrays(spec_for("tiny_imagenet", tmp_path))
    _assert_unreadable_message(str(err.value), bad)


# ==================================================================== found by a tester's run


def _rec(d: Path, seed: int, acc: float, **extra) -> None:
    import json as _json

    d.mkdir(parents=True)
    rec = {"dataset": "cifar10", "pool": "avg", "sac": False, "seed": seed, "epochs": 1,
           "status": "completed", "test_acc": acc,
           "config": {"dataset": {"name": "cifar10"}, "pool": {"name": "avg"},
                      "trainer": {"epochs": 1}, "seed": seed}, **extra}
    (d / "result.json").write_text(_json.dumps(rec))


def test_report_counts_a_copied_run_folder_once(tmp_path):
    import pytest as _pytest

    from flexexp.report import report

    runs = tmp_path / "runs"
    _rec(runs / "a" / "s0", 0, 90.0)
    _rec(runs / "a" / "s1", 1, 92.0)
    _rec(runs / "backup" / "s0", 0, 90.0)  # a copy of seed 0's folder
    with _pytest.warns(UserWarning, match="2 records of the same run .*counted once"):
        out = report(runs, tmp_path / "out")
    row = out["table1"].set_index(["dataset", "variant"]).loc[("cifar10", "avg")]
    assert row.n == 2 and row["mean"] == 91.0


def test_report_skips_records_that_contradict_their_config(tmp_path):
    import pytest as _pytest

    from flexexp.report import report

    runs = tmp_path / "runs"
    _rec(runs / "ok", 0, 90.0)
    _rec(runs / "edited", 1, 99.0, epochs=5)  # its config says 1 epoch
    _rec(runs / "short", 2, 99.0, history=[])  # completed after 1 epoch, no history
    d = runs / "bare"
    d.mkdir(parents=True)
    (d / "result.json").write_text('{"dataset": "cifar10", "pool": "avg", "sac": false, '
                                   '"seed": 3, "status": "completed", "test_acc": 99.0}')
    with _pytest.warns(UserWarning) as caught:
        out = report(runs, tmp_path / "out")
    text = " ".join(str(w.message) for w in caught)
    assert "epochs is 5 but its config says trainer.epochs=1" in text
    assert "history has 0" in text and "has no config" in text
    row = out["table1"].set_index(["dataset", "variant"]).loc[("cifar10", "avg")]
    assert row.n == 1 and row["mean"] == 90.0
