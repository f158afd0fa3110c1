#!/usr/bin/env python3
"""Writes tests/fixtures/generate/reference.json: transformers' greedy `generate` token ids on the tiny
fixtures, with and without the PEFT adapter, for the Rust generation tests.

Pinned environment (the versions these fixtures were generated with):
    torch==2.15.0  transformers==5.24.0  peft==0.21.2  safetensors==0.8.0  (Python 3.11)

Regenerate (from the repository root, after scripts/make_fixtures.py and make_lora_fixtures.py):
    .venv/bin/python scripts/make_generate_fixtures.py

Each case loads a checkpoint in float32 with eager attention (optionally wrapped by
PeftModel.from_pretrained), and calls `generate(prompt, max_new_tokens=32, do_sample=False,
repetition_penalty=...)` for each prompt separately (batch 1, no padding). The tiny checkpoints
have no end-of-sequence token (config `eos_token_id` null), so every run produces exactly 32 tokens.
`processors` holds, for three sampling settings (Qwen2.5-7B-Instruct's generation_config.json
values among them), each step's raw logits, the context and generate's processed `scores` (which
tokens stay finite, and their values) from a 4-token sampled run with the adapter.
`min_margin` is the smallest gap between the best and second-best processed score over the 32 steps:
a greedy mismatch at a step whose gap is below ~1e-5 would be a near-tie, not a bug.
"""
import json
import os

import torch
from peft import PeftModel
from transformers import Qwen2ForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join("tests", "fixtures")
OUT = os.path.join(FIX, "generate")
NEW = 32


def prompts():
    g = torch.Generator().manual_seed(2024)
    return [torch.randint(0, 256, (1, n), generator=g) for n in (8, 3)]


CASES = [
    # name, base checkpoint, adapter or None, repetition_penalty
    ("tied-f32", "tiny-tied-f32", None, 1.0),
    ("untied-f32-sharded", "tiny-untied-f32-sharded", None, 1.0),
    ("untied-f32-sharded+peft", "tiny-untied-f32-sharded", "peft-tiny-untied", 1.0),
    ("untied-f32-sharded+peft/rep1.3", "tiny-untied-f32-sharded", "peft-tiny-untied", 1.3),
]


def main():
    os.chdir(ROOT)
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)
    cases = []
    for name, base, adapter, rep in CASES:
        model = Qwen2ForCausalLM.from_pretrained(
            os.path.join(FIX, base), dtype=torch.float32, attn_implementation="eager")
        if adapter:
            model = PeftModel.from_pretrained(model, os.path.join(FIX, adapter))
        model.eval()
        runs = []
        for ids in prompts():
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                    do_sample=False, repetition_penalty=rep, eos_token_id=None, pad_token_id=0,
                    output_scores=True, return_dict_in_generate=True)
            new = out.sequences[0, ids.shape[1]:].tolist()
            assert len(new) == NEW, (name, len(new))
            margins = []
            for s in out.scores:
                top = torch.topk(s[0].float(), 2).values
                margins.append(float(top[0] - top[1]))
            runs.append({"prompt": ids[0].tolist(), "tokens": new, "min_margin": min(margins)})
        cases.append({"name": name, "model": base, "adapter": adapter,
                      "repetition_penalty": rep, "max_new_tokens": NEW, "runs": runs})
        print(name, [r["tokens"][:8] for r in runs], "min margin",
              min(r["min_margin"] for r in runs))
    # The processors as generate runs them: sample with Qwen2.5-7B-Instruct's settings and record,
    # per step, the raw logits (`output_logits`), the processed scores (`output_scores`) and the
    # context they were computed from.
    model = PeftModel.from_pretrained(
        Qwen2ForCausalLM.from_pretrained(os.path.join(FIX, "tiny-untied-f32-sharded"),
                                         dtype=torch.float32, attn_implementation="eager"),
        os.path.join(FIX, "peft-tiny-untied")).eval()
    ids = prompts()[0]
    processors = []
    for sampling in [dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.8,
                          repetition_penalty=1.05),
                     dict(do_sample=True, temperature=1.3, top_k=0, top_p=0.5,
                          repetition_penalty=1.3),
                     dict(do_sample=False, repetition_penalty=1.3)]:
        torch.manual_seed(5)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=4, eos_token_id=None, pad_token_id=0,
                                 output_scores=True, output_logits=True,
                                 return_dict_in_generate=True, **sampling)
        steps = []
        for i, (raw, sc) in enumerate(zip(out.logits, out.scores)):
            sc = sc[0]
            kept = torch.isfinite(sc)
            steps.append({"context": out.sequences[0, :ids.shape[1] + i].tolist(),
                          "logits": raw[0].tolist(),
                          "kept": kept.nonzero().flatten().tolist(),
                          "scores_kept": sc[kept].tolist()})
        processors.append({"config": sampling, "steps": steps})
    meta = {"generator": "scripts/make_generate_fixtures.py", "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "peft": __import__("peft").__version__, "cases": cases,
            "processors": processors}
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
