"""flexexp.bench: the benchmark's report, its timing of variants, the reference loop's process."""

from __future__ import annotations

import json
import os
import statistics
import time

import pytest
import torch
from helpers import TINY, approx_f64, gamma, run_cli

from flexexp import bench

BENCH_KEYS = {"harness_img_s", "compute_bound_img_s", "reference_img_s", "harness_over_compute",
              "harness_over_reference", "flex_overhead", "sac_overhead", "startup_s",
              "startup_probes_s", "sweep_setup_s", "sweep_later_over_first",
              "sweep_setup_reused", "peak_rss_mb", "precision", "channels_last", "compile",
              "cudnn_benchmark", "fused_optimizer"}


@pytest.mark.slow
def test_bench_prints_a_table_and_a_json_last_line(tmp_path):
    proc = run_cli(["--rounds", "1", "--warmup", "0", "--workers", "0", "--startup-probes", "2",
                    "--variants", "flex", *TINY], cwd=tmp_path,
                   module="flexexp.bench")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert BENCH_KEYS <= result.keys()
    for key in ("harness_img_s", "compute_bound_img_s", "reference_img_s", "peak_rss_mb",
                "startup_s"):
        assert result[key] > 0, key
    # c/h against (b/h)/(b/c): four roundings in all
    assert result["harness_over_compute"] == approx_f64(
        result["harness_img_s"] / result["compute_bound_img_s"], 4)
    assert result["harness_over_reference"] == approx_f64(
        result["harness_img_s"] / result["reference_img_s"], 4)
    # two start-up probes, each a 3-cell sweep in one process: a fresh process's start-up
    # to its first step, and each cell's set-up + first step
    probes, sweeps = result["startup_probes_s"], result["sweep_setup_s"]
    assert len(probes) == 2 and all(v > 0 for v in probes)
    assert result["startup_s"] == statistics.median(probes)  # the same expression
    assert len(sweeps) == 2 and all(len(s) == 3 and all(v > 0 for v in s) for s in sweeps)
    # per probe: an addition and a division for the mean, one division for the ratio; the
    # median of two adds an addition and a halving: at most 5 roundings on each side
    assert result["sweep_later_over_first"] == approx_f64(
        statistics.median((s[1] + s[2]) / 2 / s[0] for s in sweeps), 12)
    # the later cells of each sweep took over the first's data and model (flexexp.reuse)
    assert result["sweep_setup_reused"] == [[{"data": False, "model": False},
                                             *[{"data": True, "model": True}] * 2]] * 2
    assert "sweep set-up (cells 1/2/3):" in proc.stdout
    # the speed settings as resolved for a CPU: fp32, NCHW, eager; printed in the table
    assert (result["precision"], result["channels_last"], result["compile"]) == (
        "float32", False, "none")
    assert "precision float32, channels_last false, compile none" in proc.stdout
    # the base was added and timed once, next to the variant: one round's overhead is
    # the ratio of the two step times
    step = result["variant_step_s"]
    assert set(step) == {"avg", "flex"} and result["variant_base"] == {"flex": "avg"}
    # a ratio near 1 minus 1: two roundings of a number near 1, an absolute error
    ratio = step["flex"] / step["avg"]
    assert result["flex_overhead_steps"] == pytest.approx(ratio - 1, rel=0,
                                                          abs=gamma(4, torch.float64) * ratio)
    assert result["sac_overhead_steps"] is None  # no SAC variant asked for
    # the heads-only comparison: a time per variant, and its extra over the base's step
    heads, step = result["variant_heads_s"], result["variant_step_s"]
    assert set(heads) == set(step) and all(v > 0 for v in heads.values())
    for n, b in result["variant_base"].items():
        # the same expression on the same numbers (JSON keeps a float64 exactly)
        assert result["variant_heads_overhead"][n] == (heads[n] - heads[b]) / step[b]
    assert result["flex_overhead"] == result["variant_heads_overhead"]["flex"]
    assert result["sac_overhead"] is None
    assert "harness / compute_bound" in proc.stdout and "start-up to first step" in proc.stdout
    # the reference loop ran in its own process, without the harness's allocator setting
    assert result["reference_process"] == "own" and "(reference in its own process)" in proc.stdout
    assert result["keep_heap"] is True and result["reference_keep_heap"] is False
    assert result["reference_peak_rss_mb"] > 0
    # one number per round and mode; the summary is images over the modes' total time
    rounds = result["round_img_s"]
    assert set(rounds) == {"compute_bound", "harness", "reference"}
    assert len(rounds["reference"]) == 1
    assert result["reference_img_s"] == approx_f64(rounds["reference"][0], 4)


def test_variants_are_timed_with_their_bases():
    assert bench.with_bases(["flex_reg_dropout+sac", "flex"]) == [
        "avg", "flex_reg_dropout", "flex_reg_dropout+sac", "flex"]
    assert bench.with_bases(["flex", "avg+sac"]) == ["avg", "flex", "avg+sac"]
    assert bench.with_bases(["avg"]) == ["avg"]
    assert all(base is None or base in bench.VARIANTS for _, base in bench.VARIANTS.values())


@pytest.mark.slow
def test_bench_times_a_base_asked_for_alone(tmp_path):
    proc = run_cli(["--rounds", "2", "--warmup", "0", "--workers", "0", "--no-startup",
                    "--variants", "avg", "--reference-process", "shared", *TINY],
                   cwd=tmp_path, module="flexexp.bench")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["variant_step_s"]) == {"avg"} and result["variant_step_s"]["avg"] > 0
    assert "variant_overhead" not in result and result["startup_s"] is None
    assert result["startup_probes_s"] == result["sweep_setup_s"] == []
    assert result["sweep_later_over_first"] is None
    assert "start-up to first step: not measured" in proc.stdout
    # the reference loop ran here: no process of its own to report on
    assert result["reference_process"] == "shared" and "reference_keep_heap" not in result
    assert result["reference_img_s"] > 0


def test_reference_process_that_fails_gives_a_clear_error():
    # the child composes its own config: a bad one makes it exit before it is ready
    with pytest.raises(bench.FlexexpError, match=r"reference loop's process exited with code 2"
                                                 r".*--reference-process shared"):
        bench.ReferenceProcess([*TINY, "dataset=nope"], 64, 0)


def test_reference_process_reports_the_exit_code_read_just_after_the_pipe_closes():
    """The reply pipe reaches end-of-file a moment before the exit status can be read
    (on a busy machine, seconds): the error still gives the exit code."""

    class Exiting:  # a child that has closed its pipe but is not yet reaped
        def poll(self):
            return None

        def wait(self, timeout=None):
            return 2

    read_fd, write_fd = os.pipe()
    os.close(write_fd)
    ref = object.__new__(bench.ReferenceProcess)
    ref._fd, ref._buf, ref.proc = read_fd, b"", Exiting()
    try:
        with pytest.raises(bench.FlexexpError, match="exited with code 2"):
            ref._reply("ready")
    finally:
        os.close(read_fd)


def test_reference_process_checks_its_batch_size():
    with pytest.raises(bench.FlexexpError, match="batches of 64 images where this benchmark "
                                                 "expects 32"):
        bench.ReferenceProcess(TINY, 32, 0)


def test_reference_process_steps_on_request_and_times_in_the_child():
    ref = bench.ReferenceProcess(TINY, 64, 0)
    try:
        ref.run(1)  # untimed
        t0 = time.perf_counter()
        ref.time(2, torch.device("cpu"))
        wall = time.perf_counter() - t0
        # the child's time for both steps, divided by 2: within the round trip's wall time
        assert len(ref.step_times) == 1 and 0 < 2 * ref.step_times[0] <= wall
    finally:
        ref.close()
    assert ref.proc.returncode == 0
    assert ref.info["keep_heap"] is False and ref.info["peak_rss_mb"] > 0
    ref.close()  # a second close does nothing


def test_throughput_is_images_over_total_time():
    mode = bench.Mode("m", lambda n: None, images_per_step=10)
    mode.step_times = [1.0, 3.0]
    assert mode.img_s == 5.0  # 20 images in 4 s, not the mean of 10 and 3.3 images/s


def test_bench_rejects_bad_arguments(tmp_path):
    proc = run_cli(["--variants", "nope", *TINY], cwd=tmp_path, module="flexexp.bench")
    assert proc.returncode == 2 and "unknown --variants ['nope']" in proc.stderr


def _write_result(path, seed, setup_s, first_step_s, reused, status="completed"):
    path.mkdir(parents=True)
    (path / "result.json").write_text(json.dumps({
        "seed": seed, "status": status, "startup_s": 2.5, "setup_s": setup_s,
        "first_step_s": first_step_s, "setup_reused": {"data": reused, "model": reused},
        "test_acc": 10.0}))


def test_sweep_probe_cells_are_read_in_seed_order(tmp_path):
    # the directories sort in another order than the seeds
    _write_result(tmp_path / "a" / "seed2-x", 2, 0.25, 0.5, True)
    _write_result(tmp_path / "b" / "seed0-x", 0, 1.5, 40.0, False)
    _write_result(tmp_path / "c" / "seed1-x", 1, 0.125, 0.75, True)
    cells = bench.read_sweep_probe(tmp_path)
    assert [c["setup_s"] for c in cells] == [1.5, 0.125, 0.25]
    assert [c["first_step_s"] for c in cells] == [40.0, 0.75, 0.5]
    assert [c["setup_reused"]["model"] for c in cells] == [False, True, True]
    assert all(c["startup_s"] == 2.5 for c in cells)


@pytest.mark.parametrize("case", ["missing", "failed"])
def test_sweep_probe_needs_every_cell_completed(tmp_path, case):
    _write_result(tmp_path / "0", 0, 1.0, 1.0, False)
    _write_result(tmp_path / "1", 1, 1.0, 1.0, True)
    if case == "failed":
        _write_result(tmp_path / "2", 2, 1.0, 1.0, True, status="failed")
    with pytest.raises(bench.FlexexpError, match="seeds \\[0, 1\\]" if case == "missing"
                       else "seed=2 has status 'failed'"):
        bench.read_sweep_probe(tmp_path)


def test_startup_summary_of_two_probes():
    def cell(startup, setup, first):
        return {"startup_s": startup, "setup_s": setup, "first_step_s": first,
                "setup_reused": {"data": setup < 1, "model": setup < 1}}

    probes = [[cell(2.0, 1.5, 40.0), cell(2.0, 0.125, 0.75), cell(2.0, 0.25, 0.5)],
              [cell(3.0, 2.5, 30.0), cell(3.0, 0.5, 1.0), cell(3.0, 0.25, 1.25)]]
    out = bench.startup_summary(probes)
    assert out["startup_probes_s"] == [3.5, 5.5]  # first cell's start-up + set-up
    assert out["startup_s"] == 4.5  # their median (exact in binary: dyadic numbers)
    assert out["sweep_setup_s"] == [[41.5, 0.875, 0.75], [32.5, 1.5, 1.5]]
    # later over first: a sum, two divisions per probe; the median adds a sum and a halving
    expected = ((0.875 + 0.75) / 2 / 41.5 + (1.5 + 1.5) / 2 / 32.5) / 2
    assert out["sweep_later_over_first"] == approx_f64(expected, 8)
    assert out["sweep_setup_reused"][1][1] == {"data": True, "model": True}
    assert bench.startup_summary([]) == {
        "startup_s": None, "startup_probes_s": [], "sweep_setup_s": [],
        "sweep_later_over_first": None, "sweep_setup_reused": []}


def test_sweep_probe_command_runs_three_seeds_after_the_overrides():
    cmd = bench.sweep_probe_command(["seed=7", "trainer.compile=default"], 64, "/tmp/r")
    assert cmd[1:5] == ["-m", "flexexp.train", "-m", "seed=7"]
    # the probe's seeds come after the benchmarked overrides: Hydra's last value wins
    assert cmd.index("seed=0,1,2") > cmd.index("seed=7")
    assert cmd[-3:] == ["dataset.train_size=64", "trainer.progress=false", "paths.runs=/tmp/r"]


def test_table_prints_the_resolved_settings_and_the_sweep():
    r = {"device": "cuda:0", "precision": "bfloat16", "channels_last": True,
         "compile": "reduce-overhead", "cudnn_benchmark": True, "fused_optimizer": True,
         "compute_bound_img_s": 100.0, "harness_img_s": 90.0, "reference_img_s": 50.0,
         "harness_over_compute": 0.9, "harness_over_reference": 1.8, "peak_rss_mb": 1000.0,
         "startup_s": 4.5, "startup_probes_s": [3.5, 5.5],
         "sweep_setup_s": [[41.5, 0.875, 0.75], [32.5, 1.5, 1.5]],
         "sweep_later_over_first": 0.0334}
    table = bench.format_table(r)
    assert table.splitlines()[0] == (
        "cuda:0: precision bfloat16, channels_last true, compile reduce-overhead, "
        "cudnn_benchmark true, fused_optimizer true")
    assert "start-up to first step: 4.50 s (median of 3.50, 5.50)" in table
    # each cell's median over the probes
    assert "sweep set-up (cells 1/2/3): 37.00 / 1.19 / 1.12 s" in table
    assert "later cells / first: 0.033" in table
