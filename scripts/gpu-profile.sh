#!/usr/bin/env bash
# A second GPU call for issue 9: where the CUDA numbers of scripts/gpu-check.sh come from.
#   1. f32 logits of the fixtures through PyTorch on the GPU with TF32 off and on (scripts/tf32_check.py):
#      the yardstick for our f32 parity there (Burn's CUDA matmul stages f32 as TF32);
#   2. Burn's matmul rate on the device (bf16 and f32) for the products of a 7B LoRA step;
#   3. one 7B bf16 LoRA step (4 x 384) under CubeCL's kernel profiler: time per kernel ($OUT/profile.log);
#   4. the same step unprofiled, timed with a device sync; 5. again with full autotuning.
# Run there from the repository root: bash scripts/gpu-profile.sh   (about 4 minutes on an H200)
set -uo pipefail
BIN=$(readlink -f "${BIN:-gpu/xtask}"); OUT=$(mkdir -p "${OUT:-gpu-results}" && readlink -f "${OUT:-gpu-results}")
PY=${PY:-python3}; WORK=${WORK:-$(mktemp -d)}
: > "$OUT/profile.jsonl"
source "$(dirname "$0")/gpu-env.sh"
log() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

log "1. TF32 yardstick"
timeout 90 $PY scripts/tf32_check.py >> "$OUT/profile.jsonl" 2>>"$OUT/profile-stderr.log" || echo "tf32_check FAILED"

log "2. matmul rate"
for dt in bf16 f32; do
  timeout 90 "$BIN" bench-matmul --device cuda --dtype $dt --shapes 8192x8192x8192,1536x3584x18944t,1536x18944x3584,1536x3584x3584t,1536x3584x8t,1536x8x3584 \
    >> "$OUT/profile.jsonl" 2>>"$OUT/profile-stderr.log" || echo "bench-matmul $dt FAILED"
done

log "3. profiled step"
mkdir -p "$WORK/prof"
printf '[profiling.logger]\nlevel = "basic"\nfile = "%s"\nappend = false\n' "$OUT/profile.log" > "$WORK/prof/cubecl.toml"
(cd "$WORK/prof" && timeout 150 "$BIN" bench-train --size 7b --batch 4 --seq 384 --steps 1 --device cuda --dtype bf16) \
  >> "$OUT/profile.jsonl" 2>>"$OUT/profile-stderr.log" || echo "profiled step FAILED"

log "4. unprofiled step"
timeout 120 "$BIN" bench-train --size 7b --batch 4 --seq 384 --steps 3 --device cuda --dtype bf16 \
  >> "$OUT/profile.jsonl" 2>>"$OUT/profile-stderr.log" || echo "step FAILED"

log "5. the same step with CubeCL's most thorough autotuning"
CUBECL_AUTOTUNE_LEVEL=full timeout 150 "$BIN" bench-train --size 7b --batch 4 --seq 384 --steps 3 --device cuda --dtype bf16 \
  >> "$OUT/profile.jsonl" 2>>"$OUT/profile-stderr.log" || echo "full-autotune step FAILED"

log "results"
cat "$OUT/profile.jsonl"
[ -f "$OUT/profile.log" ] && { ls -la "$OUT/profile.log"; tail -n 60 "$OUT/profile.log"; }
