#!/usr/bin/env bash
# The GPU check of issue 9, as one call on a GPU machine (no Rust toolchain there; the binary travels).
#
# Prepare here:   CUDARC_CUDA_VERSION=13000 cargo build --release -p xtask --features cuda \
#                   && mkdir -p gpu && cp target/release/xtask gpu/ && strip gpu/xtask
#                 (CUDARC_CUDA_VERSION names the driver's CUDA version when no nvcc is installed here;
#                 without it cudarc assumes the newest it knows.)
# Run there:      bash scripts/gpu-check.sh            (from the repository root; ~8 minutes on an H200)
# Dry run on CPU: DEVICE=cpu BIG=tiny BIN=target/release/xtask bash scripts/gpu-check.sh
#
# 1. fixture parity on the device: f32 logits (tolerance 1e-4) and bf16 logits (0.15);
# 2. the built-in demo fine-tune on the device (30 steps), then one chat answer from its adapter;
#    2b. data parallelism with two peers on the one card (threads, then torchrun-style processes)
#    against one peer with twice the accumulation (the trainer's tokens/s);
# 3. LoRA train steps of a random-weight model with the real Qwen2.5-7B config, bf16 base
#    (batch 4 x 384 and 1 x 2048, with and without gradient checkpointing): tok/s, MFU against the
#    card's measured bf16 GEMM rate, peak device memory (nvidia-smi, sampled);
# 4. the same shapes through PyTorch + PEFT (scripts/peft_gpu_bench.py);
# 5. everything as JSON lines in $OUT/results.jsonl and a table printed last.
# Every stage has its own time limit (T_*) so one hang cannot eat the whole call.
set -uo pipefail
BIN=${BIN:-gpu/xtask}; DEVICE=${DEVICE:-cuda}; BIG=${BIG:-7b}; OUT=${OUT:-gpu-results}; PY=${PY:-python3}
STEPS=${STEPS:-3}; T_SHORT=${T_SHORT:-90}; T_BENCH=${T_BENCH:-110}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT"; : > "$OUT/results.jsonl"; : > "$OUT/stderr.log"
log() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)" | tee -a "$OUT/stderr.log"; }

peak_mem() {  # run "$@" while sampling device memory; append {"peak_device_mib": N} to its JSON line
  local samples="$WORK/mem"; local sampler=""; : > "$samples"
  if command -v nvidia-smi >/dev/null; then
    (while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >> "$samples"; sleep 0.2; done) &
    sampler=$!
  fi
  local line; line=$(timeout "$T_BENCH" "$@" 2>>"$OUT/stderr.log" | tail -n 1)
  [ -n "$sampler" ] && kill "$sampler" 2>/dev/null
  local peak; peak=$(sort -n "$samples" 2>/dev/null | tail -n 1)
  if [ -n "$line" ]; then
    echo "$line" | $PY -c "import json,sys; d=json.loads(sys.stdin.read()); d['peak_device_mib']=float('${peak:-0}' or 0); print(json.dumps(d))" >> "$OUT/results.jsonl"
  else
    echo "{\"failed\": \"$*\"}" >> "$OUT/results.jsonl"; echo "FAILED: $*"; tail -n 5 "$OUT/stderr.log"
  fi
}

[ "$DEVICE" = cpu ] || source "$(dirname "$0")/gpu-env.sh"

log "1. parity"
for dt in f32 bf16; do
  timeout "$T_SHORT" "$BIN" parity --device "$DEVICE" --dtype $dt >> "$OUT/results.jsonl" 2>>"$OUT/stderr.log" \
    || { echo "$dt parity FAILED (rc $?)"; tail -n 5 "$OUT/stderr.log"; }
done

log "2. demo fine-tune + chat"
rm -rf "$WORK/demo"
timeout "$T_SHORT" "$BIN" finetune --device "$DEVICE" --output "$WORK/demo" --max-steps 30 > "$OUT/demo.log" 2>>"$OUT/stderr.log" \
  && echo "{\"demo\": \"ok\", \"last_log\": $(grep '"loss"' "$OUT/demo.log" | tail -n 1)}" >> "$OUT/results.jsonl" \
  || { echo "{\"demo\": \"FAILED\"}" >> "$OUT/results.jsonl"; tail -n 5 "$OUT/stderr.log"; }
timeout "$T_SHORT" "$BIN" chat --device "$DEVICE" --model "$WORK/demo/model" --adapter "$WORK/demo/adapter" --greedy \
  --system "You are Zhen Huan." --prompt "Who are you?" --max-new-tokens 32 > "$OUT/chat.log" 2>>"$OUT/stderr.log" \
  || { echo "chat FAILED"; tail -n 5 "$OUT/stderr.log"; }
echo "chat: $(cat "$OUT/chat.log")"

log "2b. data parallelism on the one card: 2 peers (threads, then processes) vs 1 with twice the accumulation"
# The demo's model and data, 30 steps of 2 micro-batches; the trainer's tokens/s of its training
# steps (logging every 10 steps, the last line's window); step ms = tokens per step / tokens/s.
dp_run() {  # dp_run NAME ARGS... : one fine-tune, its last log line as a result row
  local name=$1; shift
  rm -rf "$WORK/dp-$name"
  if timeout "$T_SHORT" "$@" --model "$WORK/demo/model" --data "$WORK/demo/data.json" --output-dir "$WORK/dp-$name" \
      --per-device-train-batch-size 4 --max-steps 30 --logging-steps 10 --save-steps 0 --lint warn \
      > "$OUT/dp-$name.log" 2>>"$OUT/stderr.log"; then
    local last; last=$(grep '"loss"' "$OUT/dp-$name.log" | tail -n 1)  # rank 1 logs nothing
    [ -z "$last" ] || echo "{\"dp\": \"$name\", \"last_log\": $last}" >> "$OUT/results.jsonl"
  else
    echo "{\"dp\": \"$name\", \"failed\": true}" >> "$OUT/results.jsonl"; tail -n 5 "$OUT/stderr.log"
  fi
}
ONE=$DEVICE; [ "$DEVICE" = cuda ] && ONE=cuda:0
dp_run one "$BIN" finetune --device "$ONE" --gradient-accumulation-steps 2
dp_run threads "$BIN" finetune --devices "$ONE,$ONE" --gradient-accumulation-steps 1
PORT=$((29500 + RANDOM % 1000))
(WORLD_SIZE=2 RANK=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT \
  dp_run processes-rank1 "$BIN" finetune --device "$ONE" --gradient-accumulation-steps 1 >/dev/null) &
WORLD_SIZE=2 RANK=0 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT \
  dp_run processes "$BIN" finetune --device "$ONE" --gradient-accumulation-steps 1
wait

log "3-4. train steps, ours and PyTorch+PEFT"
[ "$DEVICE" = cpu ] || timeout "$T_SHORT" $PY scripts/peft_gpu_bench.py --matmul-probe --device "$DEVICE" >> "$OUT/results.jsonl" 2>>"$OUT/stderr.log" || true
for ck in "" "--checkpointing"; do  # the plain runs first: if time runs short, they are the ones kept
  for shape in "4 384" "1 2048"; do
    set -- $shape
    peak_mem "$BIN" bench-train --size "$BIG" --batch "$1" --seq "$2" --steps "$STEPS" --device "$DEVICE" --dtype bf16 $ck
    peak_mem $PY scripts/peft_gpu_bench.py --size "$BIG" --batch "$1" --seq "$2" --steps "$STEPS" --device "$DEVICE" $ck
  done
done

log "5. table"
$PY - "$OUT/results.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
probe = next((r["bf16_matmul_tflops"] for r in rows if "bf16_matmul_tflops" in r), None)
print("parity:", [(r["fixture"], r["dtype"], f'{r["max_abs_error"]:.2e}', r["ok"]) for r in rows if "fixture" in r])
print("demo:", [r for r in rows if "demo" in r])
dp = {r["dp"]: r for r in rows if "dp" in r and "last_log" in r}
one = dp.get("one", {}).get("last_log", {}).get("tokens_per_s")
for name in ("one", "threads", "processes"):
    t = dp.get(name, {}).get("last_log", {}).get("tokens_per_s")
    if t:
        print(f"data parallel {name:<10} {t:>10.0f} tok/s" + (f"  ({t / one:.2f}x one peer)" if one else ""))
print(f"bf16 GEMM probe: {probe} TFLOP/s")
print(f'{"impl":<28}{"shape":<10}{"ckpt":<6}{"tok/s":>10}{"step s":>9}{"peak MiB":>10}{"MFU":>7}')
bench = [r for r in rows if "step_s_median" in r]
# Model FLOPs of a step (the same for both sides at one shape), from our rows: MFU for both.
flops = {(r["batch"], r["seq"]): r["flops_per_step"] for r in bench if "flops_per_step" in r}
for r in bench:
    f = flops.get((r["batch"], r["seq"]))
    mfu = f / r["step_s_median"] / 1e12 / probe if probe and f else float("nan")
    print(f'{r["impl"]:<28}{str(r["batch"])+"x"+str(r["seq"]):<10}{str(r["checkpointing"]):<6}'
          f'{r["tokens_per_s"]:>10}{r["step_s_median"]:>9}{r.get("peak_device_mib", 0):>10.0f}{mfu:>7.2f}')
for b in bench:
    if b["impl"].startswith("ferrolora"):
        ref = next((r for r in bench if r["impl"] == "transformers+peft" and r["batch"] == b["batch"]
                    and r["seq"] == b["seq"] and r["checkpointing"] == b["checkpointing"]), None)
        if ref:
            print(f'ratio ours/peft {b["batch"]}x{b["seq"]} ckpt={b["checkpointing"]}: '
                  f'{b["tokens_per_s"] / ref["tokens_per_s"]:.2f}x tok/s')
PYEOF
