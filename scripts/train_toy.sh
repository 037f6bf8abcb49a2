#!/usr/bin/env bash
# The whole OmniForcing recipe at toy scale (issues #6, #12), in order, into RUN (default runs/toy):
# codecs -> data -> teacher -> ODE pairs -> Stage II causal -> Stage III DMD -> report, ablation, export.
# Every stage resumes when re-run; each prints its wall time. EXPORT=0 skips replacing the shipped assets;
# TEACHER_STEPS / CAUSAL_STEPS / DMD_STEPS override the stage configs' step counts.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
RUN="${1:-runs/toy}"
T="$OMNIFORCING_PY -m omniforcing_core.toy"
CFG_AV="${CFG_AV:-2}"  # the teacher's modality guidance when it makes ODE pairs and DMD targets
stage() { local name=$1; shift; local t0=$SECONDS; echo "== $name: $*"; "$@"; echo "== $name done in $((SECONDS - t0)) s"; }
[ -f "$RUN/codecs/codecs.safetensors" ] || stage codecs $T codecs --out "$RUN/codecs" --clips 384 --steps 2000
[ -f "$RUN/data/latents.json" ] || stage data $T data --codecs "$RUN/codecs" --out "$RUN/data" --n 2400
# conditional training, ramped: the share of samples with one modality given clean (sigma 0) is 0.25 for
# steps 0-2000, 0.5 for 2000-4000, then the config's 0.6 (with 0.3 independent sigmas) to the end
stage teacher $T train --stage teacher --run "$RUN/teacher" --data "$RUN/data" --steps 2000 --set given_share=0.25 independent_sigmas=0.25
stage teacher $T train --stage teacher --run "$RUN/teacher" --data "$RUN/data" --steps 4000 --set given_share=0.5 independent_sigmas=0.25
stage teacher $T train --stage teacher --run "$RUN/teacher" --data "$RUN/data" ${TEACHER_STEPS:+--steps $TEACHER_STEPS}
stage ode $T train --stage ode --run "$RUN/ode" --data "$RUN/data" --teacher "$RUN/teacher" --set cfg_av=$CFG_AV
stage causal $T train --stage causal --run "$RUN/causal" --data "$RUN/ode" --init "$RUN/teacher" ${CAUSAL_STEPS:+--steps $CAUSAL_STEPS}
stage dmd $T train --stage dmd --run "$RUN/dmd" --data "$RUN/data" --init "$RUN/causal" --teacher "$RUN/teacher" --set cfg_av=$CFG_AV ${DMD_STEPS:+--steps $DMD_STEPS}
stage report $T report --teacher "$RUN/teacher" --student "$RUN/dmd" --stage2 "$RUN/causal" --codecs "$RUN/codecs" --n 48 --cfg-av $CFG_AV --json "$RUN/report.json"
[ "${ABLATION:-1}" = 1 ] && stage ablation $T ablation --teacher "$RUN/teacher" --data "$RUN/ode" --out "$RUN/ablation"
if [ "${EXPORT:-1}" = 1 ]; then
  stage export $T export --student "$RUN/dmd" --codecs "$RUN/codecs"
  stage demo-sync $T demo-sync
fi
