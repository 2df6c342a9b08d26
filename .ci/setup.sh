#!/usr/bin/env bash
# Create (once) and refresh the project's virtual environment; print its path.
# The venv lives outside the clone so that a fresh clone reuses torch (a large download) from the last run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DETECTOR_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/detector/venv}"
stamp="$venv/.detector-stamp"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16) $root"
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating virtual environment in $venv" >&2
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing the project and its dependencies (first run downloads torch: several minutes)" >&2
  "$venv/bin/python" -m pip install -q -e "$root[dev]" >&2
  echo "$want" > "$stamp"
fi
echo "$venv"
