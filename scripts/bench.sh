#!/usr/bin/env bash
# The whole benchmark table: batch 1000, synthetic 32x32 (the paper's setting), across
# precisions, memory formats and compile modes. Extra arguments go to every run, e.g.
# trainer.device=cuda.
# Flags go to every run too (bash scripts/bench.sh --rounds 7). Prints each run's table;
# the JSON lines are collected in results/bench/<host>.jsonl.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
out="results/bench/$(hostname).jsonl"
mkdir -p "$(dirname "$out")"
: > "$out"
# 50,000 training images: the epoch of CIFAR-10 (50 steps at batch 1000)
base=(dataset=synthetic dataset.image_size=32 dataset.train_size=50000 trainer.batch_size=1000)
if python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  # "" is the defaults (on a GPU: bf16, channels_last, compile=reduce-overhead), first:
  # the variants and the start-up probes (sweep set-up) are measured with what users
  # get; then plain fp32 eager, and each compile mode at bf16 + channels_last
  settings=("" "trainer=plain"
            "trainer.precision=bf16 trainer.channels_last=true trainer.compile=none"
            "trainer.precision=bf16 trainer.channels_last=true trainer.compile=default"
            "trainer.precision=bf16 trainer.channels_last=true trainer.compile=reduce-overhead")
else
  # the CPU defaults are fp32, NCHW, eager (trainer.compile=auto is none on a CPU).
  # The last rows show what trainer.keep_heap (flexexp/runtime.py) gains on a CPU: once
  # lent to the reference loop too (run in the benchmark's process), once turned off
  settings=("trainer.precision=fp32" "trainer.precision=fp32 trainer.channels_last=true"
            "trainer.precision=bf16" "trainer.precision=bf16 trainer.channels_last=true"
            "trainer.precision=fp32 --reference-process shared"
            "trainer.precision=fp32 trainer.keep_heap=false")
fi
first=1
for s in "${settings[@]}"; do
  echo "=== ${s:-(defaults)}" >&2
  # variants and start-up are measured once, with the first (default) setting
  extra=(--variants "" --no-startup)
  [[ $first == 1 ]] && extra=()
  # shellcheck disable=SC2086
  python -m flexexp.bench "${extra[@]}" "${base[@]}" $s "$@" | tee >(cat >&2) \
    | tail -n 1 >> "$out"
  first=0
done
python - "$out" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
cols = ["precision", "channels_last", "compile", "keep_heap", "reference process",
        "compute bound img/s", "harness img/s", "reference img/s", "harness/compute",
        "harness/reference"]
print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
for r in rows:
    cells = [r["precision"], str(r["channels_last"]).lower(), str(r.get("compile")),
             str(r.get("keep_heap")).lower(),
             r.get("reference_process", "shared"),
             f"{r['compute_bound_img_s']:.0f}", f"{r['harness_img_s']:.0f}",
             f"{r['reference_img_s']:.0f}", f"{r['harness_over_compute']:.3f}",
             f"{r['harness_over_reference']:.2f}"]
    print("| " + " | ".join(cells) + " |")
PY
