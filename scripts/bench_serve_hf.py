#!/usr/bin/env python3
"""transformers' side of the serving benchmark (the Rust side is `cargo xtask bench-serve`).

Pinned environment:
    torch==2.15.0  transformers==5.24.0  (Python 3.11)

Run (from the repository root):
    .venv/bin/python scripts/bench_serve_hf.py [--batches 1,8,32] [--threads N]

The `mini` config of benches/generate.rs and bench-serve (Qwen2.5-0.5B's layer shape with 4 layers,
the real vocabulary, tied head, random weights, float32 on the CPU). For each batch size B:
`generate` on B prompts of 129 tokens (left-padded to equal length, as batched `generate` needs),
greedy, exactly --new tokens each (`min_new_tokens` = `max_new_tokens`, no end token). Reported:
B · new tokens over the wall time of the whole call (prefill included) — the quantity bench-serve
reports as "tokens/s (all)" for B concurrent clients — and the time of the prefill alone.
Each number is the median of --reps runs after one warm-up.
"""
import argparse
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

PROMPT = 129


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                      num_hidden_layers=4, num_attention_heads=14, num_key_value_heads=2,
                      tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6)
    cfg._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(cfg).eval().float()
    print(f"torch {torch.__version__}, threads {a.threads}, {PROMPT}-token prompts, {a.new} new tokens")
    print("batch | tokens/s (all) | x batch 1 | prefill ms")
    base = None
    for b in [int(x) for x in a.batches.split(",")]:
        ids = torch.tensor([[(i * 7919 + 13 + r * 31) % 151000 for i in range(PROMPT)] for r in range(b)])
        mask = torch.ones_like(ids)

        def gen():
            t = time.perf_counter()
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=a.new,
                                     min_new_tokens=a.new, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)
            assert out.shape == (b, PROMPT + a.new)
            return time.perf_counter() - t

        def prefill():
            t = time.perf_counter()
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - t

        gen()
        g = statistics.median(gen() for _ in range(a.reps))
        p = statistics.median(prefill() for _ in range(a.reps))
        tps = b * a.new / g
        base = base or tps
        print(f"{b:>5} | {tps:>14.1f} | {tps / base:>9.2f} | {p * 1e3:>10.1f}")


if __name__ == "__main__":
    main()
