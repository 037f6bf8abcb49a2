#!/usr/bin/env bash
# The README's test command: the whole suite on CPU, one intra-op thread. ComfyUI host and browser tests
# (tests/comfy) run when COMFYUI_DIR is set; with CI=true they must run (a skip there is a failure).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh" || exit 1
set +e  # env.sh turns on -e; the exit status below is pytest's
cd "$ROOT"
# one thread per process, also for the subprocesses the tests start (ComfyUI server, torchrun workers)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
[ $# -eq 0 ] && set -- tests
"$OMNIFORCING_PY" -m pytest -q -p no:cacheprovider -rfEs --durations=10 "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "test.sh: pytest collected no tests - the suite is missing or was deselected; failing" >&2
  exit 1
fi
exit $rc
