#!/usr/bin/env bash
# Set up like demo.sh, then lint and run the whole test suite, one pytest-xdist worker
# per logical CPU (at most 4; tests/conftest.py gives each its share of torch's
# threads). Extra arguments go to pytest, e.g.
# `bash scripts/test.sh -m "not slow"` for the quick tier, or `-n 0` for one process.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m ruff check flexexp tests scripts
python -m pytest -q -n logical --maxprocesses 4 "$@"
