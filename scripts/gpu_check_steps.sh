# The GPU check's steps (bash scripts/gpu_check.sh without --grid; its header says what
# they do). Sourced by gpu_check.sh after its options are parsed and its Python set up:
# reads PY, DRY, OUT, RUNS and EXTRA from there.

# Seconds each step may take on the GPU: 8 minutes in all on one H100, with ~20 s to spare
# for the set-up. A step that runs out is stopped (its line says timed_out) and the next
# one starts.
BUDGET_TIER=170 BUDGET_BENCH=70 BUDGET_PLAIN=40 BUDGET_TRAIN=180

# python -c: the training run, and the peak GPU memory it allocated written at its exit
TRAIN_WRAPPER='
import atexit, json, sys
def _peak(path=sys.argv[1]):
    import torch
    mb = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mb = max(torch.cuda.max_memory_allocated(i)
                 for i in range(torch.cuda.device_count())) / 2**20
    with open(path, "w") as f:
        json.dump({"peak_gpu_mb": mb}, f)
atexit.register(_peak)
sys.argv = ["flexexp.train", *sys.argv[2:]]
from flexexp.train import main
main()
'

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# run_step NAME BUDGET LOG CMD...: CMD with stdout and stderr in LOG, within BUDGET seconds;
# sets STEP_RC and STEP_S (its exit status, 124 when it ran out of time, and its seconds)
run_step() {
  local name="$1" budget="$2" log="$3" t0
  shift 3
  echo "[gpu_check] $name (budget ${budget} s; log $log)"
  t0=$(now)
  STEP_RC=0
  timeout -k 15 "$budget" "$@" >"$log" 2>&1 || STEP_RC=$?
  STEP_S=$(since "$t0")
  if [[ $STEP_RC == 0 ]]; then
    echo "[gpu_check] $name: done in $STEP_S s"
  else
    local why="exit $STEP_RC"
    [[ $STEP_RC == 124 || $STEP_RC == 137 ]] && why="out of time"
    echo "[gpu_check] $name: FAILED ($why) after $STEP_S s; the end of its log:" >&2
    tail -n 25 "$log" >&2
  fi
}

gpu_check_main() {
  local report=(scripts/gpu_check_report.py) size epochs bench_args images logs dev
  local cell=(pool=flex_reg_dropout sac=on)
  if [[ $DRY == 1 ]]; then  # the same steps on the CPU at tiny sizes, never into results/
    OUT="${OUT:-runs/gpu-check-dry}" RUNS="${RUNS:-$OUT/runs}"
    size=(dataset=synthetic dataset.image_size=16 dataset.train_size=200 dataset.test_size=100
          trainer.batch_size=100 trainer.device=cpu)
    epochs=2 images=200
    bench_args=(--rounds 1 --steps 1 --warmup 1 --workers 0 --no-startup --variants "")
    BUDGET_TIER=120 BUDGET_BENCH=120 BUDGET_PLAIN=120 BUDGET_TRAIN=120
  else
    $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
      echo "error: no CUDA GPU here. Use --dry-run to check the steps on a CPU." >&2; return 2; }
    OUT="${OUT:-results/bench}" RUNS="${RUNS:-runs/gpu-check}"
    # synthetic CIFAR-10: 50,000 + 10,000 images of 32x32, batch 1000 (50 steps an epoch)
    size=(dataset=synthetic dataset.image_size=32 dataset.train_size=50000
          dataset.test_size=10000 trainer.batch_size=1000 trainer.device=cuda)
    epochs=100 images=50000
    bench_args=(--rounds 4 --steps 3 --warmup 3 --no-startup --variants "")
  fi
  dev=$($PY "${report[@]}" device)
  logs="$RUNS/$(date +%Y%m%d-%H%M%S)"
  mkdir -p "$OUT" "$logs"
  local jsonl="$OUT/gpu-$dev.jsonl" md="$OUT/gpu-$dev.md" failed=0 t_all
  : > "$jsonl"
  t_all=$(now)

  run_step "GPU tier" "$BUDGET_TIER" "$logs/tier.log" \
    "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
  $PY "${report[@]}" tier "$logs/tier.log" --rc "$STEP_RC" --wall "$STEP_S" --jsonl "$jsonl"

  local name budget setting
  for name in defaults plain; do
    budget=$BUDGET_BENCH setting=()
    [[ $name == plain ]] && budget=$BUDGET_PLAIN setting=(trainer=plain)
    run_step "bench $name" "$budget" "$logs/bench-$name.log" \
      bash -c '"$@" 2>"$0"' "$logs/bench-$name.err" "$PY" -m flexexp.bench \
      "${bench_args[@]}" "${size[@]}" "${cell[@]}" "${setting[@]}" "${EXTRA[@]}"
    [[ $STEP_RC == 0 ]] || tail -n 25 "$logs/bench-$name.err" >&2
    $PY "${report[@]}" bench "$logs/bench-$name.log" --setting "$name" --rc "$STEP_RC" \
      --wall "$STEP_S" --epoch-images "$images" --jsonl "$jsonl"
  done

  run_step "train $epochs epochs" "$BUDGET_TRAIN" "$logs/train.log" \
    "$PY" -c "$TRAIN_WRAPPER" "$logs/peak.json" "${size[@]}" "${cell[@]}" \
    "trainer.epochs=$epochs" trainer.progress=false "paths.runs=$logs/cell" "${EXTRA[@]}"
  $PY "${report[@]}" train "$logs/cell" --setting defaults --rc "$STEP_RC" --wall "$STEP_S" \
    --peak "$logs/peak.json" --jsonl "$jsonl"

  echo "[gpu_check] all steps in $(since "$t_all") s; $jsonl, $md:"
  $PY "${report[@]}" summary "$jsonl" "$md"
  $PY -c 'import json, sys; sys.exit(any(not json.loads(l)["ok"] for l in open(sys.argv[1])))' \
    "$jsonl" || failed=1
  [[ $failed == 0 ]] || echo "[gpu_check] a step failed or ran out of time: see $jsonl" >&2
  return $failed
}
