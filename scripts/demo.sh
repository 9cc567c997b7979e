#!/usr/bin/env bash
# The main job: sets up .venv when needed, then runs `clipkd demo` on the embedded toyworld data.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
export HF_HUB_OFFLINE=1
exec .venv/bin/clipkd demo "$@"
