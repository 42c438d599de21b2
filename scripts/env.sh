# Sourced by scripts/serve and scripts/test: creates .venv on first use and (re)installs the
# project whenever pyproject.toml changed since the last install. Idempotent and offline-safe
# apart from the package registry.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TRANSFER_SERVE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[transfer-serve] creating virtual environment in $VENV" >&2
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.transfer-serve-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[transfer-serve] installing dependencies (first run: a few minutes)" >&2
  # (this machine's pip config lists local indexes that may be absent: hide that noise only)
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev]" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export BENTOML_DO_NOT_TRACK=True
cd "$ROOT"
