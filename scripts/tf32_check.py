#!/usr/bin/env python3
"""How far f32 logits move when matrix products run in TF32 on a GPU (issue 9's f32 parity).

Burn's CUDA matmul (cubek-matmul) stages f32 operands as TF32 on tensor-core GPUs, which PyTorch
does only with `torch.backends.cuda.matmul.allow_tf32 = True`. This runs transformers on the
committed tiny fixtures on the GPU with TF32 off and on and prints, for each, the max abs error
against the fixture's CPU f32 reference logits: the yardstick for `xtask parity --device cuda`.
    python3 scripts/tf32_check.py [--device cuda] [--fixtures tests/fixtures]
"""
import argparse, json, os

import torch
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--device", default="cuda")
p.add_argument("--fixtures", default="tests/fixtures")
a = p.parse_args()
for name in ["tiny-tied-f32", "tiny-untied-f32-sharded", "tiny-tied-bf16-sharded", "tiny-untied-bf16"]:
    d = os.path.join(a.fixtures, name)
    ref = load_file(os.path.join(d, "reference.safetensors"))
    model = Qwen2ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").to(a.device).eval()
    row = {"impl": "torch", "fixture": name, "device": a.device}
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        with torch.no_grad():
            out = model(input_ids=ref["input_ids"].to(a.device), attention_mask=ref["attention_mask"].to(a.device))
        row[f"max_abs_error_tf32_{'on' if tf32 else 'off'}"] = (out.logits.float().cpu() - ref["logits"]).abs().max().item()
    print(json.dumps(row))
