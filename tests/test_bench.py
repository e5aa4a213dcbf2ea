"""flexexp.bench: the benchmark's report, its timing of variants, the reference loop's process."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from helpers import TINY, approx_f64, gamma, run_cli

from flexexp import bench

BENCH_KEYS = {"harness_img_s", "compute_bound_img_s", "reference_img_s", "harness_over_compute",
              "harness_over_reference", "flex_overhead", "sac_overhead", "startup_s",
              "peak_rss_mb"}


@pytest.mark.slow
def test_bench_prints_a_table_and_a_json_last_line(tmp_path):
    proc = run_cli(["--rounds", "1", "--warmup", "0", "--workers", "0", "--startup-probes", "1",
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
    assert len(result["startup_probes_s"]) == 1
    assert result["startup_s"] == result["startup_probes_s"][0]
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












