"""flexexp.rundir: the run directory's lock, claim and checks, through the CLI."""

from __future__ import annotations

import pytest
from helpers import TINY, make_cfg, only_run_dir, run_cli

from flexexp import rundir, trainer
from flexexp.errors import FlexexpError


def test_unwritable_run_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the runs root should be")
    proc = run_cli([*TINY, f"paths.runs={blocker}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "cannot write to the run directory root" in proc.stderr
    assert "is not a directory" in proc.stderr and "paths.runs=DIR" in proc.stderr
    assert blocker.read_text() == "a file where the runs root should be"


def test_run_directory_with_another_config_is_refused(tmp_path):
    first = run_cli([*TINY, f"paths.runs={tmp_path}"], cwd=tmp_path)
    assert first.returncode == 0
    run_dir = only_run_dir(tmp_path)
    before = (run_dir / "result.json").read_bytes(), (run_dir / "last.pt").read_bytes()
    proc = run_cli([*TINY, "trainer.epochs=2", f"paths.runs={tmp_path}",
                    f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "holds a run of a different config (differs in: trainer.epochs)" in proc.stderr
    assert "delete that directory to start fresh" in proc.stderr
    assert ((run_dir / "result.json").read_bytes(), (run_dir / "last.pt").read_bytes()) == before


def test_a_cell_being_trained_elsewhere_is_not_touched(tmp_path):
    cfg = make_cfg(TINY)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with rundir.exclusive(run_dir):
        with pytest.raises(FlexexpError, match="another process .* is training"):
            trainer.run(cfg, run_dir)
    assert not (run_dir / "result.json").exists()
    assert trainer.run(cfg, run_dir)["status"] == "completed"
