#!/usr/bin/env bash
# The main job on the embedded digits data: the pooling x SAC grid (experiment=demo),
# then Tables 1 and 2 for it. Extra arguments go to the training command, e.g.
#   bash scripts/demo.sh trainer.epochs=5
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
RUNS="${FLEXEXP_DEMO_RUNS:-runs/demo}"
OUT="${FLEXEXP_DEMO_OUT:-results/demo}"
start=$(date +%s)
python -m flexexp.train experiment=demo paths.runs="$RUNS" trainer.progress=false "$@"
python -m flexexp.report paths.runs="$RUNS" out_dir="$OUT"
echo "[flexexp] demo finished in $(( $(date +%s) - start )) s; runs in $RUNS, tables in $OUT"
