#!/usr/bin/env bash
# The whole OmniForcing recipe at toy scale (issue #6), in order, into RUN (default runs/toy):
# codecs -> data -> teacher -> ODE pairs -> Stage II causal -> Stage III DMD -> report, ablation, export.
# Every stage resumes when re-run; each prints its wall time. EXPORT=0 skips replacing the shipped assets;
# TEACHER_STEPS / CAUSAL_STEPS / DMD_STEPS override the stage configs' step counts.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
RUN="${1:-runs/toy}"
T="$OMNIFORCING_PY -m omniforcing_core.toy"
stage() { local name=$1; shift; local t0=$SECONDS; echo "== $name: $*"; "$@"; echo "== $name done in $((SECONDS - t0)) s"; }
[ -f "$RUN/codecs/codecs.safetensors" ] || stage codecs $T codecs --out "$RUN/codecs"
[ -f "$RUN/data/latents.json" ] || stage data $T data --codecs "$RUN/codecs" --out "$RUN/data"
stage teacher $T train --stage teacher --run "$RUN/teacher" --data "$RUN/data" ${TEACHER_STEPS:+--steps $TEACHER_STEPS}
stage ode $T train --stage ode --run "$RUN/ode" --data "$RUN/data" --teacher "$RUN/teacher"
stage causal $T train --stage causal --run "$RUN/causal" --data "$RUN/ode" --init "$RUN/teacher" ${CAUSAL_STEPS:+--steps $CAUSAL_STEPS}
stage dmd $T train --stage dmd --run "$RUN/dmd" --data "$RUN/data" --init "$RUN/causal" --teacher "$RUN/teacher" ${DMD_STEPS:+--steps $DMD_STEPS}
stage report $T report --teacher "$RUN/teacher" --student "$RUN/dmd" --stage2 "$RUN/causal" --codecs "$RUN/codecs" --json "$RUN/report.json"
[ "${ABLATION:-1}" = 1 ] && stage ablation $T ablation --teacher "$RUN/teacher" --data "$RUN/ode" --out "$RUN/ablation"
if [ "${EXPORT:-1}" = 1 ]; then
  stage export $T export --student "$RUN/dmd" --codecs "$RUN/codecs"
  stage demo-sync $T demo-sync
fi
