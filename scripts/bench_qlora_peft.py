#!/usr/bin/env python3
"""transformers + PEFT + bitsandbytes QLoRA steps on the CPU, the reference for
`cargo xtask bench-train --load-in-4bit` (same shapes, same recipe).

Pinned environment:
    torch==2.15.0  transformers==5.24.0  peft==0.21.2  bitsandbytes==0.50.2  (Python 3.11)

Run (from the repository root):
    .venv/bin/python scripts/bench_qlora_peft.py [--size mini] [--batch 4 --seq 384] [--no-4bit]

The model of ../shared/bench/peft_baseline.py (`mini`: Qwen2.5-0.5B's layer shape, 4 layers, the
real vocabulary, random weights) is written to a temporary directory and loaded back with
BitsAndBytesConfig(load_in_4bit=True, nf4, double quantization, float32 compute), wrapped with the
tutorial's LoraConfig (r 8, alpha 32, dropout 0.1, the seven projections) and trained for --steps
timed AdamW steps (after --warmup) on fixed random tokens with the first third of the labels masked.
Prints one JSON line: median step time, tokens/s and peak RSS.
"""
import argparse
import json
import os
import resource
import tempfile
import time

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM

SIZES = {
    "mini": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=4,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                 tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                 tie_word_embeddings=False),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="mini", choices=SIZES)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=384)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-4bit", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = Qwen2Config(rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
                      **SIZES[a.size])
    with tempfile.TemporaryDirectory() as d:
        Qwen2ForCausalLM(cfg).save_pretrained(d)
        q = None if a.no_4bit else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
        model = Qwen2ForCausalLM.from_pretrained(d, dtype=torch.float32, quantization_config=q,
                                                 device_map="cpu", attn_implementation="sdpa")
    lcfg = LoraConfig(task_type=TaskType.CAUSAL_LM,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                      "down_proj"],
                      r=8, lora_alpha=32, lora_dropout=0.1)
    model = get_peft_model(model, lcfg)
    model.train()
    opt = torch.optim.AdamW([x for x in model.parameters() if x.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=g)
    labels = ids.clone()
    labels[:, : a.seq // 3] = -100
    times = []
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(dict(impl="transformers+peft" + ("" if a.no_4bit else "+bitsandbytes nf4"),
                          size=a.size, batch=a.batch, seq=a.seq, threads=a.threads,
                          step_s_median=round(med, 4), tokens_per_s=round(a.batch * a.seq / med, 1),
                          peak_rss_mib=round(rss, 1), loss=round(out.loss.item(), 4))))


if __name__ == "__main__":
    main()
