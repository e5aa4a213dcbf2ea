# Sourced by demo.sh and test.sh: use the active Python environment, or create .venv.
# Installs flexexp (editable, with dev extras) when it is missing or pyproject.toml changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${VIRTUAL_ENV:-}" && -z "${CONDA_PREFIX:-}" ]]; then
  if [[ ! -x .venv/bin/python ]]; then
    echo "[flexexp] creating .venv" >&2
    python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
PY=python
stamp=".venv-installed"
[[ -n "${VIRTUAL_ENV:-}" ]] && stamp="$VIRTUAL_ENV/.flexexp-installed"
want="$(sha1sum pyproject.toml | cut -d' ' -f1)"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]] || ! $PY -c "import flexexp" 2>/dev/null; then
  echo "[flexexp] installing flexexp and its dependencies (first time: a few minutes)" >&2
  $PY -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  $PY -m pip install --quiet -e ".[dev]"
  echo "$want" > "$stamp"
fi
export PYTHONUNBUFFERED=1
