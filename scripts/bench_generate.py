#!/usr/bin/env python3
"""transformers' side of the generation benchmark (the Rust side is benches/generate.rs).

Pinned environment:
    torch==2.15.0  transformers==5.24.0  (Python 3.11)

Run (from the repository root):
    .venv/bin/python scripts/bench_generate.py [--threads N] [--attn sdpa|eager]

The `mini` config: Qwen2.5-0.5B's layer shape (hidden 896, MLP 4864, 14 query / 2 key-value heads)
with 4 layers and the real vocabulary (151,936, tied head), random weights, float32 on CPU.
Prompt of 128 tokens, greedy.
* prefill: `model(prompt, use_cache=True, logits_to_keep=1)` — what `generate` runs first.
* decode: `generate(max_new_tokens=33, min_new_tokens=33)` minus the prefill time, divided over the
  32 single-token steps after the first token (the same quantity benches/generate.rs reports).
Each number is the median of --reps runs after one warm-up.
"""
import argparse
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

PROMPT, NEW = 128, 32


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                      num_hidden_layers=4, num_attention_heads=14, num_key_value_heads=2,
                      tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6)
    cfg._attn_implementation = a.attn
    model = Qwen2ForCausalLM(cfg).eval().float()
    ids = torch.tensor([[(i * 7919 + 13) % 151000 for i in range(PROMPT)]])
    mask = torch.ones_like(ids)

    def prefill():
        t = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t

    def gen():
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW + 1,
                                 min_new_tokens=NEW + 1, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        assert out.shape[1] == PROMPT + NEW + 1
        return time.perf_counter() - t

    prefill(), gen()  # warm-up
    p = statistics.median(prefill() for _ in range(a.reps))
    g = statistics.median(gen() for _ in range(a.reps))
    decode = g - p
    print(f"torch {torch.__version__}, threads {a.threads}, attn {a.attn}")
    print(f"prefill: {p * 1e3:.1f} ms for {PROMPT} tokens = {PROMPT / p:.1f} tokens/s")
    print(f"generate {NEW + 1} tokens: {g * 1e3:.1f} ms; decode {NEW} steps: {decode * 1e3:.1f} ms "
          f"= {NEW / decode:.2f} tokens/s ({decode / NEW * 1e3:.1f} ms/token)")


if __name__ == "__main__":
    main()
