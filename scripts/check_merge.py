#!/usr/bin/env python3
"""Checks that `cargo xtask merge` writes a model transformers loads and that equals PEFT's merge.

Pinned environment:
    torch==2.15.0  transformers==5.24.0  peft==0.21.2  safetensors==0.8.0  (Python 3.11)

Run (from the repository root; builds and runs the merge command itself):
    .venv/bin/python scripts/check_merge.py

For the f32 base tests/fixtures/tiny-untied-f32-sharded and the bf16 base tests/fixtures/tiny-untied-bf16
(same shapes), each with the PEFT adapter tests/fixtures/peft-tiny-untied:
1. `cargo xtask merge --max-shard-size 300KB` (150KB for bf16) into a temporary directory: 2 shards;
2. `Qwen2ForCausalLM.from_pretrained(merged)` — the stored dtype must be the base's;
3. PEFT: `PeftModel.from_pretrained(base, adapter).merge_and_unload()`;
4. compare every weight (max |diff|, and for bf16 how many elements differ at all) and the logits
   on the fixtures' padded batch (float32 compute for both, eager attention).
Exits non-zero when a logit differs by more than 1e-5 (f32) / 1e-2 (bf16 weights, f32 compute).
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join("tests", "fixtures")
ADAPTER = os.path.join(FIX, "peft-tiny-untied")


def main():
    os.chdir(ROOT)
    ref = load_file(os.path.join(FIX, "tiny-untied-f32-sharded", "reference.safetensors"))
    ids, mask = ref["input_ids"], ref["attention_mask"]
    ok = True
    for base, dtype, tol, shard in [("tiny-untied-f32-sharded", torch.float32, 1e-5, "300KB"),
                                    ("tiny-untied-bf16", torch.bfloat16, 1e-2, "150KB")]:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "merged")
            subprocess.run(["cargo", "xtask", "merge", "--model", os.path.join(FIX, base),
                            "--adapter", ADAPTER, "--output", out, "--max-shard-size", shard],
                           check=True)
            files = sorted(os.listdir(out))
            index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
            shards = sorted(set(index["weight_map"].values()))
            ours = Qwen2ForCausalLM.from_pretrained(out, dtype="auto", attn_implementation="eager")
            stored = {p.dtype for p in ours.parameters()}
            peft = PeftModel.from_pretrained(
                Qwen2ForCausalLM.from_pretrained(os.path.join(FIX, base), dtype="auto",
                                                 attn_implementation="eager"),
                ADAPTER).merge_and_unload()
            w_ours, w_peft = ours.state_dict(), peft.state_dict()
            assert w_ours.keys() == w_peft.keys(), set(w_ours) ^ set(w_peft)
            w_max, w_neq, n = 0.0, 0, 0
            for k in w_peft:
                a, b = w_ours[k].float(), w_peft[k].float()
                w_max = max(w_max, (a - b).abs().max().item())
                w_neq += (a != b).sum().item()
                n += a.numel()
            with torch.no_grad():
                la = ours.float()(input_ids=ids, attention_mask=mask).logits
                lb = peft.float()(input_ids=ids, attention_mask=mask).logits
            real = mask.bool()
            err = (la - lb).abs()[real].max().item()
            print(f"{base}: files {files}; {len(shards)} shards; stored dtype {stored}; "
                  f"weights max |diff| {w_max:.3e}, {w_neq}/{n} elements differ; "
                  f"logits max |diff| (real tokens) {err:.3e}")
            ok &= stored == {dtype} and len(shards) == 2 and err <= tol
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
