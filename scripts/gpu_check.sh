#!/usr/bin/env bash
# GPU checks, run on a machine with one CUDA GPU (or as a CPU dry run, which CI runs).
#
#   bash scripts/gpu_check.sh --prepare                 # here: wheels + data to carry (.whl/, .gpu-data/)
#   bash scripts/gpu_check.sh                           # there: the GPU check (below), ~8 min
#   bash scripts/gpu_check.sh --dry-run                 # CPU, tiny sizes: the same steps
#   bash scripts/gpu_check.sh --grid fashion_mnist      # there: the paper's Fashion-MNIST rows
#   bash scripts/gpu_check.sh --grid fashion_mnist --dry-run   # CPU, tiny sizes: the same steps
#
# Without --grid: the GPU check, each step within its time budget (`timeout`):
#   1. the GPU test tier (python -m pytest -q -m gpu tests/test_gpu.py; 200 s);
#   2. python -m flexexp.bench at the GPU defaults (bf16, NHWC, CUDA graphs; 90 s) and with
#      trainer=plain (fp32, NCHW, eager; 60 s), on the heaviest cell (pool=flex_reg_dropout
#      sac=on), synthetic CIFAR-10 sizes (32x32, 50,000 + 10,000 images, batch 1000);
#   3. one 100-epoch cell at those sizes and the GPU defaults, the whole process timed (150 s).
# One JSON line per measurement goes to --out (default results/bench)/gpu-<device>.jsonl
# (device: the GPU's name, e.g. nvidia-h100-80gb-hbm3), the table to gpu-<device>.md, which
# is printed. Exits 1 if a step failed or ran out of time (its line says which). --dry-run:
# the same steps on the CPU at 200 images, batch 100, 2 epochs, into runs/gpu-check-dry
# (never results/); the GPU tier skips there.
#
# --grid fashion_mnist trains the Fashion-MNIST rows of Tables 1 and 2: 4 pooling variants x
# SAC off/on, 100 epochs at batch 1000 (the paper's recipe), for each seed of --seeds
# (default 0; the paper's tables use 0,1,2), then writes the report beside the paper's
# numbers into --out (default results/fmnist-gpu). GPU settings: bf16 autocast and
# channels_last (recorded in every result.json), 4 cells at a time on the one GPU
# (hydra/launcher=joblib: small ResNet20 steps leave a GPU idle between kernels).
#
# Options: --seeds 0,1,2  --out DIR  --runs DIR  --data-root DIR  --jobs N  --dry-run
# Anything after `--` is passed to every training run (e.g. -- trainer.compile=true).
#
# Where hydra-core/omegaconf (or, for the GPU check, pytest) are not installed (the lent GPU
# machines), they are installed from the wheels in .whl/ (made by --prepare) into a
# temporary folder on PYTHONPATH. The data of --grid come from --data-root (default
# .gpu-data, made by --prepare from Debian's package dataset-fashion-mnist or from data/),
# and are verified against the published MD5s.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

GRID="" SEEDS="0" OUT="" RUNS="" DATA=".gpu-data" JOBS=4 DRY=0 PREPARE=0 EXTRA=()
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --grid) GRID="$2"; shift 2 ;;
    --seeds) SEEDS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    --data-root) DATA="$2"; shift 2 ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --prepare) PREPARE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "error: unknown option '$1'." >&2; usage >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python3}"
[[ -x .venv/bin/python && -z "${PYTHON:-}" ]] && PY=.venv/bin/python

if [[ $PREPARE == 1 ]]; then
  # Everything a bare GPU machine lacks, into ignored folders that `carry` takes along.
  mkdir -p .whl "$DATA/FashionMNIST/raw"
  $PY -m pip wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3
  $PY -m pip download --quiet --no-deps -d .whl "hydra-core>=1.3.2,<1.4" "omegaconf>=2.3" \
    hydra-joblib-launcher
  # pytest for the GPU tier (pure-Python wheels; exceptiongroup and tomli for Python 3.10)
  $PY -m pip download --quiet --no-deps -d .whl pytest pluggy iniconfig packaging pygments \
    exceptiongroup tomli
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
           t10k-labels-idx1-ubyte; do
    src=""
    for d in /usr/share/datasets/fashion-mnist data/FashionMNIST/raw; do
      [[ -f "$d/$f.gz" ]] && { src="$d/$f.gz"; break; }
    done
    [[ -n $src ]] || { echo "error: no $f.gz in /usr/share/datasets/fashion-mnist or" \
      "data/FashionMNIST/raw: apt-get install dataset-fashion-mnist, or run" \
      "python -m flexexp.data download dataset=fashion_mnist." >&2; exit 2; }
    cp "$src" "$DATA/FashionMNIST/raw/$f.gz"
  done
  echo "[gpu_check] ready to carry: .whl/ ($(ls .whl | wc -l) wheels) and $DATA/" \
       "($(du -sh "$DATA" | cut -f1))"
  exit 0
fi

[[ -z "$GRID" || "$GRID" == "fashion_mnist" ]] || {
  echo "error: --grid fashion_mnist is the one grid so far (got '$GRID')." >&2
  usage >&2; exit 2; }

NEED=()
$PY -c "import hydra, omegaconf" 2>/dev/null || NEED+=(hydra-core omegaconf)
[[ -z "$GRID" ]] && ! $PY -c "import pytest" 2>/dev/null && NEED+=(pytest)
if [[ ${#NEED[@]} -gt 0 ]]; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "error: ${NEED[*]} not installed and .whl/ holds" \
    "no wheels: run 'bash scripts/gpu_check.sh --prepare' where pip reaches PyPI, and carry" \
    ".whl." >&2; exit 2; }
  SITE="$(mktemp -d)"
  $PY -m pip install --quiet --no-index --no-deps --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [[ -z "$GRID" ]]; then
  source "$ROOT/scripts/gpu_check_steps.sh"
  gpu_check_main
  exit $?
fi

if [[ $DRY == 1 ]]; then  # a dry run never writes into results/
  RUNS="${RUNS:-runs/fmnist-gpu-dry}" OUT="${OUT:-runs/fmnist-gpu-dry/report}"
else
  RUNS="${RUNS:-runs/fmnist-gpu}" OUT="${OUT:-results/fmnist-gpu}"
fi
if [[ $DRY == 1 ]]; then
  # the same commands at CPU sizes: 200 training images, 1 epoch, batch 100
  SIZE=(trainer.device=cpu trainer.epochs=1 dataset.train_size=200 dataset.test_size=100
        trainer.batch_size=100 trainer.precision=fp32)
  JOBS=1
else
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "error: no CUDA GPU here. Use --dry-run to check the steps on a CPU." >&2; exit 2; }
  SIZE=(trainer.device=cuda trainer.epochs=100 trainer.precision=bf16 trainer.channels_last=true)
fi
LAUNCH=()
[[ $JOBS -gt 1 ]] && LAUNCH=(hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS")

echo "[gpu_check] data: $DATA"
$PY -m flexexp.data download dataset=fashion_mnist "dataset.root=$DATA" "${EXTRA[@]}"
start=$(date +%s)
echo "[gpu_check] grid: fashion_mnist, 4 pools x SAC off/on, seeds $SEEDS, runs in $RUNS"
$PY -m flexexp.train -m dataset=fashion_mnist "dataset.root=$DATA" dataset.download=false \
  pool=avg,flex,flex_reg,flex_reg_dropout sac=off,on "seed=$SEEDS" "paths.runs=$RUNS" \
  trainer.progress=false "${SIZE[@]}" "${LAUNCH[@]}" "${EXTRA[@]}"
echo "[gpu_check] grid trained in $(( $(date +%s) - start )) s"
$PY -m flexexp.report "paths.runs=$RUNS" "out_dir=$OUT"
