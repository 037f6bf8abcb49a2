#!/usr/bin/env bash
# The README's test command: the whole suite on CPU. ComfyUI host tests run when COMFYUI_DIR is set.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh" || exit 1
cd "$ROOT"
[ $# -eq 0 ] && set -- tests
"$OMNIFORCING_PY" -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "test.sh: pytest collected no tests - the suite is missing or was deselected; failing" >&2
  exit 1
fi
exit $rc
