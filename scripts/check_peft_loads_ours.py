#!/usr/bin/env python3
"""Checks that PEFT loads an adapter written by this project and reproduces our logits.

Pinned environments (both checked):
    current:  torch==2.15.0 transformers==5.24.0 peft==0.21.2 safetensors==0.8.0
    tutorial: peft==0.11.1 transformers==4.44.2 accelerate==0.33.0 (with the same torch)

Run from the repository root:
    .venv/bin/python scripts/check_peft_loads_ours.py
    # the tutorial's PEFT, installed beside the venv without touching it:
    .venv/bin/pip install --target .peft011 --no-deps peft==0.11.1 transformers==4.44.2 \
        accelerate==0.33.0 "tokenizers<0.20" "huggingface-hub<0.25"
    PYTHONPATH=.peft011 .venv/bin/python scripts/check_peft_loads_ours.py

The adapter is tests/fixtures/rust-adapter-tiny-tied (written by the ignored Rust test
`write_rust_adapter_fixture`, with Rust's logits in its reference.safetensors). Exits non-zero when the
max abs logits difference exceeds 1e-4.
"""
import os
import sys

import peft
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, Qwen2ForCausalLM

TOL = 1e-4


def main():
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    base_dir = "tests/fixtures/tiny-tied-f32"
    ours = "tests/fixtures/rust-adapter-tiny-tied"
    inputs = load_file(os.path.join(base_dir, "reference.safetensors"))
    want = load_file(os.path.join(ours, "reference.safetensors"))["logits"]
    kwargs = {"attn_implementation": "eager"}
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs["dtype"] = torch.float32
    else:
        # transformers 4.x reads `rope_theta`, not the 5.x `rope_parameters` the fixture was written with.
        cfg = AutoConfig.from_pretrained(base_dir)
        cfg.rope_theta = cfg.rope_parameters["rope_theta"]
        kwargs.update(torch_dtype=torch.float32, config=cfg)
    base = Qwen2ForCausalLM.from_pretrained(base_dir, **kwargs)
    model = PeftModel.from_pretrained(base, ours).eval()
    n_lora = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
    with torch.no_grad():
        got = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    err = (got - want).abs().max().item()
    print(f"peft {peft.__version__} / transformers {transformers.__version__}: loaded {n_lora} LoRA "
          f"tensors; max abs logits error vs Rust {err:.2e} (tolerance {TOL:.0e})")
    sys.exit(0 if err <= TOL else 1)


if __name__ == "__main__":
    main()
