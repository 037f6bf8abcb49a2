#!/usr/bin/env bash
# The README's main job: stream A/V from the embedded default model (no downloads).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec "$OMNIFORCING_PY" -m omniforcing_core demo "$@"
