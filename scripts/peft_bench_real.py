#!/usr/bin/env python3
"""transformers + PEFT training-step timing on CPU, random tokens or real tutorial batches.

The Python side of `cargo xtask bench-train` (same model table, LoRA config, optimizer and JSON
fields as ../shared/bench/peft_baseline.py), with the `--real-data FILE --tokenizer DIR` mode the
shared script lacks: the Huanhuan records tokenized by the tutorial's process_func (seed template,
MAX_LENGTH 384), `--batch` records per step in file order, right-padded by DataCollatorForSeq2Seq;
tokens/s then counts non-padding tokens, as the Rust side does.

Pinned: torch==2.15.0 transformers==5.24.0 peft==0.21.2 (Python 3.11).
    .venv/bin/python scripts/peft_bench_real.py --size mini --steps 3 \
        --real-data ../shared/data/huanhuan/huanhuan.json --tokenizer ../shared/data/qwen2.5-tokenizer
    # random tokens (as peft_baseline.py), LoRA or DoRA (`cargo xtask bench-train --use-dora`):
    .venv/bin/python scripts/peft_bench_real.py --size mini --steps 3 [--use-dora]
"""
import argparse, json, os, resource, time

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Qwen2Config, Qwen2ForCausalLM

MODELS = {
    "mini": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=4, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False),
}
SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"


def tutorial_records(path, tok, n):
    """The tutorial's process_func on the first n records."""
    out = []
    for ex in json.load(open(path))[:n]:
        prompt = tok(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
                     f"{ex['instruction'] + ex['input']}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
        answer = tok(f"{ex['output']}", add_special_tokens=False)
        ids = prompt["input_ids"] + answer["input_ids"] + [tok.pad_token_id]
        labels = [-100] * len(prompt["input_ids"]) + answer["input_ids"] + [tok.pad_token_id]
        out.append({"input_ids": ids[:384], "attention_mask": [1] * len(ids[:384]), "labels": labels[:384]})
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="mini", choices=MODELS)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=384)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--use-dora", action="store_true", help="DoRA (use_dora=True), as bench-train --use-dora")
    p.add_argument("--real-data")
    p.add_argument("--tokenizer")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = Qwen2Config(rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
                      attn_implementation="sdpa", **MODELS[a.size])
    model = Qwen2ForCausalLM(cfg)
    if a.checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=32, lora_dropout=0.1, use_dora=a.use_dora,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    if a.real_data:
        tok = AutoTokenizer.from_pretrained(a.tokenizer)
        recs = tutorial_records(a.real_data, tok, (a.steps + 1) * a.batch)
        collate = DataCollatorForSeq2Seq(tok, padding=True)
        batches = [collate(recs[i:i + a.batch]) for i in range(0, len(recs), a.batch)]
        real = [sum(len(r["input_ids"]) for r in recs[i:i + a.batch]) for i in range(0, len(recs), a.batch)]
    else:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=g)
        labels = ids.clone()
        labels[:, : a.seq // 3] = -100
        batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}] * (a.steps + 1)
        real = [a.batch * a.seq] * (a.steps + 1)
    times, tokens = [], 0
    for step, b in enumerate(batches):
        t0 = time.perf_counter()
        out = model(**b)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        if step > 0:
            times.append(time.perf_counter() - t0)
            tokens += real[step]
    total = sum(times)
    times.sort()
    med = times[len(times) // 2]
    tps = tokens / total if a.real_data else a.batch * a.seq / med
    print(json.dumps(dict(impl="transformers+peft", torch=torch.__version__, size=a.size, batch=a.batch,
                          seq=a.seq, threads=a.threads, checkpointing=a.checkpointing, use_dora=a.use_dora,
                          real_data=bool(a.real_data),
                          step_s_median=round(med, 4), tokens_per_s=round(tps, 1),
                          peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                          loss=round(out.loss.item(), 4))))


if __name__ == "__main__":
    main()
