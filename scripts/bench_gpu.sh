#!/usr/bin/env bash
# The GPU benchmark in one command (issue 15): LTX-2 19B with random weights at 512x768 on one CUDA
# device, bf16 and fp8, eager / parallel modalities / CUDA graphs, plus the 60-block latency plot.
# Each run is one `python -m omniforcing_core bench` (per-block ms, TTFC, FPS, achieved FLOP/s vs the GEMM
# rate of the model's own shapes, cache and peak memory); the summary prints the lines to compare.
# Budget: about 5 minutes on an H200 (each run builds the 38 GB model, then ~20 blocks). Nothing is
# compared with the official code here unless OFFICIAL=/path/to/OmniForcing is set (then bf16 only).
#
#   scripts/bench_gpu.sh                 # results in bench_gpu/*.json, summary on stdout
#   OUT=DIR COMPILE=1 scripts/bench_gpu.sh   # also torch.compile (adds minutes of compilation)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
OUT="${OUT:-$ROOT/bench_gpu}"
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)" || exit 1

COMMON=(--config ltx2-19b --random-weights --device cuda --blocks 6 --window 4 --modes rolling,full --rounds 3 --json)
run() {  # name, time limit (s), extra bench arguments
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  if timeout "$limit" "$PY" -m omniforcing_core bench "${COMMON[@]}" "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"; then
    echo "[$name] done in $((SECONDS - t0)) s"
  else
    echo "[$name] FAILED after $((SECONDS - t0)) s: tail of $OUT/$name.err:"; tail -5 "$OUT/$name.err"
  fi
}

run bf16 120 --dtype bf16 ${OFFICIAL:+--compare-official "$OFFICIAL" --compare-repeat 1}
run bf16_parallel 90 --dtype bf16 --parallel-modalities on
run bf16_graphs 120 --dtype bf16 --cuda-graphs --plot "$OUT/latency_60_blocks.png" --plot-blocks 60
run fp8_graphs 120 --dtype fp8 --cuda-graphs
[ -n "${COMPILE:-}" ] && run bf16_compile_graphs 600 --dtype bf16 --compile --cuda-graphs

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'run':22s} {'rolling ms/blk':>14s} {'full ms/blk':>12s} {'TTFC s':>7s} {'FPS':>7s} {'TFLOP/s':>8s} "
      f"{'ach/GEMM':>8s} {'peak GiB':>9s} {'cache GiB (roll/full)':>22s}")
for f in sorted(out.glob("*.json")):
    try:
        d = json.loads(f.read_text())
    except Exception:
        continue
    m, s = d["modes"], d["steady_block"]
    peak = max((v.get("peak_bytes") or 0) for k, v in m.items() if not k.startswith("_")) / 2 ** 30
    print(f"{f.stem:22s} {m['rolling']['median_block_ms']:>14} {m.get('full', {}).get('median_block_ms', '-'):>12} "
          f"{d['ttfc_s']:>7} {d['video_fps_steady']:>7} {s['achieved_gflops'] / 1000:>8.1f} {s['achieved_over_gemm']:>8} "
          f"{peak:>9.1f} {m['rolling']['cache_bytes'] / 2**30:>10.2f} / {m.get('full', {}).get('cache_bytes', 0) / 2**30:.2f}")
    if "compare_official" in d:
        print("   official:", json.dumps(d["compare_official"].get("totals", d["compare_official"]))[:400])
EOF
