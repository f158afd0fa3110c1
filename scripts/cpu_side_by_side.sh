#!/usr/bin/env bash
# Side-by-side CPU training-step timing: ours (`cargo xtask bench-train`) and transformers + PEFT
# (../shared/bench/peft_baseline.py, scripts/peft_bench_real.py) on the same model, data and machine,
# one after the other, ROUNDS times (alternating, so drift in the machine's speed hits both sides).
# Writes one JSON line per run to OUT (default side_by_side.jsonl) and prints a table at the end.
#
#   python3 -m venv .venv && .venv/bin/pip install torch transformers peft
#   cargo build --release -p xtask
#   ROUNDS=2 bash scripts/cpu_side_by_side.sh      (CHECKPOINTING=1 adds the checkpointed random runs;
#                                                   DORA=1 adds DoRA random runs on both sides)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${FERROLORA_SHARED_DATA:-../shared/data}
BENCH=${FERROLORA_SHARED_BENCH:-$SHARED/../bench}
OUT=${OUT:-side_by_side.jsonl}
ROUNDS=${ROUNDS:-1}
PY=${PY:-.venv/bin/python}
X=${X:-target/release/xtask}
REAL=(--real-data "$SHARED/huanhuan/huanhuan.json" --tokenizer "$SHARED/qwen2.5-tokenizer")
: > "$OUT"
run() { # label, command...
    local label=$1; shift
    echo "== $label" >&2
    "$@" 2>/dev/null | tail -n 1 | sed "s/^{/{\"run\":\"$label\",/" >> "$OUT"
}
for _ in $(seq "$ROUNDS"); do
    run ours-random "$X" bench-train --size mini --steps 3
    run peft-random "$PY" "$BENCH/peft_baseline.py" --size mini --steps 3
    if [ -n "${CHECKPOINTING:-}" ]; then
        run ours-random-ckpt "$X" bench-train --size mini --steps 3 --checkpointing
        run peft-random-ckpt "$PY" "$BENCH/peft_baseline.py" --size mini --steps 3 --checkpointing
    fi
    if [ -n "${DORA:-}" ]; then
        run ours-random-lora "$X" bench-train --size mini --steps 3
        run peft-random-lora "$PY" scripts/peft_bench_real.py --size mini --steps 3
        run ours-random-dora "$X" bench-train --size mini --steps 3 --use-dora
        run peft-random-dora "$PY" scripts/peft_bench_real.py --size mini --steps 3 --use-dora
    fi
    run ours-real "$X" bench-train --size mini --steps 5 "${REAL[@]}"
    run ours-real-padded "$X" bench-train --size mini --steps 5 --padding-free false "${REAL[@]}"
    run peft-real "$PY" scripts/peft_bench_real.py --size mini --steps 5 "${REAL[@]}"
done
"$PY" - "$OUT" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'run':18} {'s/step':>8} {'tok/s':>8} {'peak MiB':>9}")
for r in rows:
    print(f"{r['run']:18} {r['step_s_median']:8.3f} {r['tokens_per_s']:8.1f} {r['peak_rss_mib']:9.0f}")
EOF
