"""flexexp.gpus: which GPU a run takes on a machine with several (no GPU needed)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from flexexp import engine, gpus


def test_round_robin_follows_the_job_number():
    assert [gpus.round_robin(n, 3) for n in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_least_used_fills_every_gpu_before_sharing_one(tmp_path):
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(gpus.hold_least_used(3, tmp_path)) for _ in range(5)]
        assert held == [0, 1, 2, 0, 1]
    # all released: the next run gets the first GPU again
    with gpus.hold_least_used(3, tmp_path) as gpu:
        assert gpu == 0


def test_a_finished_run_frees_its_gpu_for_the_next(tmp_path):
    with gpus.hold_least_used(2, tmp_path) as a, contextlib.ExitStack() as stack:
        b_cm = gpus.hold_least_used(2, tmp_path)
        b = stack.enter_context(b_cm)
        assert (a, b) == (0, 1)
        stack.close()  # the run on GPU 1 ends
        with gpus.hold_least_used(2, tmp_path) as c:
            assert c == 1  # GPU 1 is free again; GPU 0 is still held


def test_slots_are_held_by_other_processes_too(tmp_path):
    import subprocess
    import sys

    code = ("import sys, time\nfrom pathlib import Path\nfrom flexexp import gpus\n"
            f"with gpus.hold_least_used(2, Path({str(tmp_path)!r})) as g:\n"
            "    print(g, flush=True)\n    sys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "0"
        with gpus.hold_least_used(2, tmp_path) as gpu:
            assert gpu == 1
    finally:
        child.communicate("\n", timeout=30)


@pytest.mark.parametrize("device,policy,count,expect", [
    ("cpu", "least_used", 4, None),  # a CPU run takes no GPU
    ("cuda:1", "least_used", 4, None),  # a named GPU is kept
    ("auto", "least_used", 1, None),  # nothing to choose
    ("auto", "round_robin", 4, 3),  # job 7 of a sweep: 7 mod 4
    ("cuda", "least_used", 4, 0),
])
def test_hold_gpu_chooses_only_where_there_is_a_choice(tmp_path, monkeypatch, device, policy,
                                                       count, expect):
    monkeypatch.setenv("FLEXEXP_GPU_LOCKS", str(tmp_path))
    with gpus.hold_gpu(device, policy, job_num=7, count=count) as gpu:
        assert gpu == expect


def test_the_chosen_gpu_becomes_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert engine.resolve_device("auto", 2) == torch.device("cuda", 2)
    assert engine.resolve_device("cuda", 1) == torch.device("cuda", 1)
    assert engine.resolve_device("cuda:3", 1) == torch.device("cuda", 3)  # named: kept
    assert engine.resolve_device("cpu", 1) == torch.device("cpu")
