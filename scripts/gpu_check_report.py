"""The records of ``bash scripts/gpu_check.sh`` (the GPU check without --grid).

    python scripts/gpu_check_report.py device
    python scripts/gpu_check_report.py tier LOG --rc RC --wall S --jsonl OUT
    python scripts/gpu_check_report.py bench STDOUT --setting NAME --rc RC --wall S
        --epoch-images N --jsonl OUT
    python scripts/gpu_check_report.py train RUNS --setting NAME --rc RC --wall S --peak FILE
        --jsonl OUT
    python scripts/gpu_check_report.py summary JSONL MD

``device`` prints the slug of the GPU's name (``nvidia-h100-80gb-hbm3``; ``cpu`` without
one). ``tier``, ``bench`` and ``train`` each append one JSON line for one measurement:
the GPU tier's pytest counts, the benchmark's JSON (its last line of output), the
100-epoch cell's result.json and the process's time. A step that failed or ran out of
its time budget (``--rc``: 124 from ``timeout``) still gets its line, with ``ok: false``.
``summary`` writes the markdown table of the lines and prints it.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

COLUMNS = ["setting", "images/s", "harness/compute", "s/epoch", "process s (train)",
           "setup_s", "first_step_s", "peak GPU MB"]


def device_slug() -> str:
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _git_commit() -> str | None:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent)
    return proc.stdout.strip() or None


def _base(kind: str, setting: str, rc: int, wall: float) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {"measurement": kind, "setting": setting, "ok": rc == 0, "rc": rc,
            "timed_out": rc in (124, 137), "wall_s": wall,
            "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
            "torch_version": torch.__version__, "git_commit": _git_commit(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def tier(log: Path, rc: int, wall: float) -> dict:
    """The pytest counts of the GPU tier (from its summary line)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error")}
    summary = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped)", ln)]
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary[-1]
                              if summary else ""):
        counts["error" if what.startswith("error") else what] = int(n)
    return {**_base("gpu_tier", "tests/test_gpu.py", rc, wall), **counts,
            "ok": rc in (0, 5) and counts["failed"] == counts["error"] == 0}


def bench(stdout: Path, setting: str, rc: int, wall: float, epoch_images: int) -> dict:
    """The benchmark's JSON (the last line it printed), when it got that far;
    ``epoch_images``: the training images of an epoch at its sizes (for s/epoch)."""
    rec = {**_base("bench", setting, rc, wall), "epoch_images": epoch_images}
    lines = stdout.read_text(errors="replace").strip().splitlines() if stdout.is_file() else []
    try:
        rec.update(json.loads(lines[-1]))
    except (IndexError, json.JSONDecodeError):
        rec["ok"] = False
    return rec


def train(runs: Path, setting: str, rc: int, wall: float, peak: Path) -> dict:
    """The 100-epoch cell: its result.json's numbers and the whole process's time."""
    rec = {**_base("train", setting, rc, wall), "process_s": wall}
    found = sorted(runs.rglob("result.json"))
    if not found:
        return {**rec, "ok": False, "status": None}
    r = json.loads(found[-1].read_text())
    epochs = len(r.get("history") or []) or None
    keep = ["status", "error", "epochs", "test_acc", "images_per_s", "train_time_s",
            "wall_time_s", "setup_s", "first_step_s", "startup_s", "precision",
            "channels_last", "compile", "cudnn_benchmark", "fused_optimizer", "device",
            "run_dir"]
    rec.update({k: r.get(k) for k in keep})
    rec["s_per_epoch"] = r["train_time_s"] / epochs if epochs and r.get("train_time_s") else None
    rec["peak_gpu_mb"] = (json.loads(peak.read_text()).get("peak_gpu_mb") if peak.is_file()
                          else None)
    rec["ok"] = rc == 0 and r.get("status") == "completed"
    return rec


def _fmt(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _row(r: dict) -> list[str]:
    """One measurement's cells in the order of COLUMNS."""
    flag = "" if r.get("ok") else (" (timed out)" if r.get("timed_out") else " (failed)")
    if r["measurement"] == "bench":
        img_s = r.get("harness_img_s")
        per_epoch = r["epoch_images"] / img_s if img_s else None
        return [f"bench {r['setting']}{flag}", _fmt(img_s), _fmt(r.get("harness_over_compute"),
                3), _fmt(per_epoch, 2), "-", "-", "-", _fmt(r.get("peak_gpu_mb"))]
    return [f"train {r['setting']}, {r.get('epochs') or '-'} epochs{flag}",
            _fmt(r.get("images_per_s")), "-", _fmt(r.get("s_per_epoch"), 2),
            _fmt(r.get("process_s"), 1), _fmt(r.get("setup_s"), 2),
            _fmt(r.get("first_step_s"), 2), _fmt(r.get("peak_gpu_mb"))]


def summary(jsonl: Path, md: Path) -> str:
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    device = rows[0]["device_name"] if rows else "?"
    lines = [f"# GPU check on {device}", ""]
    for r in rows:
        if r["measurement"] == "gpu_tier":
            lines += [f"GPU tier (tests/test_gpu.py): {r['passed']} passed, {r['failed']} "
                      f"failed, {r['skipped']} skipped, {r['error']} errors in "
                      f"{r['wall_s']:.0f} s" + ("" if r["ok"] else " -- TIMED OUT" if r["timed_out"]
                                          else " -- NOT OK"), ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in rows if r["measurement"] != "gpu_tier"]
    lines += ["", "bench: images/s of the harness's path (the trainer's loop); s/epoch: one "
              "epoch's images at that speed. train: the training cell's own numbers; process "
              "s: the whole `python -m flexexp.train` process, start-up included; peak GPU "
              "MB: torch.cuda.max_memory_allocated."]
    text = "\n".join(lines) + "\n"
    md.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check_report.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["device", "tier", "bench", "train", "summary"])
    ap.add_argument("paths", nargs="*", type=Path)
    ap.add_argument("--setting", default="")
    ap.add_argument("--rc", type=int, default=0)
    ap.add_argument("--wall", type=float, default=0.0)
    ap.add_argument("--epoch-images", type=int, default=0)
    ap.add_argument("--peak", type=Path, default=Path("/nonexistent"))
    ap.add_argument("--jsonl", type=Path)
    a = ap.parse_args(argv)
    if a.what == "device":
        print(device_slug())
        return 0
    if a.what == "summary":
        print(summary(*a.paths))
        return 0
    rec = {"tier": lambda: tier(a.paths[0], a.rc, a.wall),
           "bench": lambda: bench(a.paths[0], a.setting, a.rc, a.wall, a.epoch_images),
           "train": lambda: train(a.paths[0], a.setting, a.rc, a.wall, a.peak)}[a.what]()
    with a.jsonl.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
