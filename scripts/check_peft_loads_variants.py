#!/usr/bin/env python3
"""Checks that PEFT loads this project's LoRA-variant adapters and reproduces our logits.

Pinned environment (checked with):
    torch==2.15.0 transformers==5.24.0 peft==0.21.2 safetensors==0.8.0 (Python 3.11)

Run from the repository root:
    .venv/bin/python scripts/check_peft_loads_variants.py [--dir DIR] [--no-write]

Step 1 runs the ignored Rust test `write_variant_adapters` (tests/write_variant_adapters.rs):
    FERROLORA_VARIANT_ADAPTERS=DIR cargo test --release --test write_variant_adapters -- --ignored
which, for each variant, trains an adapter with our trainer (6 steps, lr 1e-2) on
tests/fixtures/tiny-untied-f32-sharded and writes it with our logits to DIR/<variant>/:
    dora       use_dora (and use_rslora) on q,k,v,o,gate,up,down: lora_magnitude_vector trained
    lora-bias  lora_bias on the seven (o, gate, up, down have no base bias: fine unmerged)
    pissa      init_lora_weights="pissa": PEFT re-runs the SVD on the base when loading
    olora      init_lora_weights="olora": likewise with the QR
    modules-to-save   modules_to_save=["lm_head", "embed_tokens"]: both tables trained in full
    trainable-tokens  trainable_token_indices=[1, 5, 7, 200]: those embedding rows trained
Step 2 loads each with PeftModel.from_pretrained on the same base (float32, eager attention) and
compares the logits. Prints the max abs difference per variant; exits non-zero when one exceeds 1e-4.
--no-write skips step 1 (DIR must hold a previous run's output). DIR defaults to a temporary
directory.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import peft
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM

TOL = 1e-4
VARIANTS = ["dora", "lora-bias", "pissa", "olora", "modules-to-save", "trainable-tokens"]
BASE = "tests/fixtures/tiny-untied-f32-sharded"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", help="where the adapters are written (default: a temporary directory)")
    p.add_argument("--no-write", action="store_true", help="compare the adapters already in --dir")
    a = p.parse_args()
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    out = os.path.abspath(a.dir or tempfile.mkdtemp(prefix="variant-adapters-"))
    if not a.no_write:
        env = dict(os.environ, FERROLORA_VARIANT_ADAPTERS=out)
        subprocess.run(["cargo", "test", "--release", "--test", "write_variant_adapters", "--",
                        "--ignored"], env=env, check=True)
    inputs = load_file(os.path.join(BASE, "reference.safetensors"))
    worst = 0.0
    for v in VARIANTS:
        d = os.path.join(out, v)
        want = load_file(os.path.join(d, "reference.safetensors"))["logits"]
        base = Qwen2ForCausalLM.from_pretrained(BASE, dtype=torch.float32, attn_implementation="eager")
        model = PeftModel.from_pretrained(base, d).eval()
        cfg = model.peft_config["default"]
        extra = [n for n, _ in model.named_parameters()
                 if "lora_magnitude_vector" in n or ("lora_B" in n and n.endswith(".bias"))]
        with torch.no_grad():
            got = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        err = (got - want).abs().max().item()
        worst = max(worst, err)
        # How far the adapter moves the logits from the base's: what a wrong load would miss.
        effect = (want - inputs["logits"]).abs().max().item()
        print(f"{v:10} use_dora={cfg.use_dora} lora_bias={cfg.lora_bias} init={cfg.init_lora_weights!r}: "
              f"{len(extra)} magnitude/bias tensors; max abs logits diff vs ours {err:.2e} "
              f"(the adapter moves the base's logits by up to {effect:.2e})")
    print(f"peft {peft.__version__} / transformers {transformers.__version__} / torch {torch.__version__}: "
          f"worst {worst:.2e} (tolerance {TOL:.0e}); adapters in {out}")
    sys.exit(0 if worst <= TOL else 1)


if __name__ == "__main__":
    main()
