#!/usr/bin/env bash
# Set up like demo.sh, then lint and run the whole test suite. Extra arguments go to
# pytest, e.g. `bash scripts/test.sh -m "not slow"` for the quick tier.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m ruff check flexexp tests scripts
python -m pytest -q "$@"
