#!/usr/bin/env python3
"""Writes the PEFT LoRA reference fixtures under tests/fixtures/peft-tiny-untied/.

Pinned environment (the versions these fixtures were generated with):
    torch==2.15.0  transformers==5.24.0  peft==0.21.2  safetensors==0.8.0  (Python 3.11)

Regenerate (from the repository root, after scripts/make_fixtures.py):
    .venv/bin/pip install torch==2.15.0 transformers==5.24.0 peft==0.21.2 safetensors==0.8.0 \
        && .venv/bin/python scripts/make_lora_fixtures.py

On the base checkpoint tests/fixtures/tiny-untied-f32-sharded, a PEFT LoRA with the tutorial's
targets (q,k,v,o,gate,up,down), r=8, alpha=32, dropout 0 and init_lora_weights=False (A and B both
random, so the adapter changes the output) is saved with `save_pretrained` (adapter_model.safetensors
+ adapter_config.json), and `reference.safetensors` holds:
    input_ids, attention_mask, labels  [3, 10]  labels: -100 on the first 4 positions and on padding
    logits         [3, 10, vocab]  PeftModel forward (float32, eager attention)
    logits_merged  [3, 10, vocab]  after merge_and_unload
    loss           [1]             transformers' causal-LM loss (shifted, -100 ignored, mean)
    grad.<path>    every lora_A / lora_B gradient of that loss, keyed by our module path
`peft_reference.json` holds print_trainable_parameters numbers for the tiny model and for the real
Qwen2.5-7B-Instruct config.json (meta device: no weights instantiated) with the tutorial's config.
"""
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, Qwen2ForCausalLM
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

# Paths are relative to the repository root (the script chdirs there), so the adapter_config.json
# PEFT writes names the base model as `tests/fixtures/tiny-untied-f32-sharded`, not a machine path.
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BASE = os.path.join("tests", "fixtures", "tiny-untied-f32-sharded")
OUT = os.path.join("tests", "fixtures", "peft-tiny-untied")
SHARED = os.environ.get("FERROLORA_SHARED_DATA", os.path.join("..", "shared", "data"))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def counts(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def main():
    os.chdir(ROOT)
    from safetensors.torch import load_file
    ref = load_file(os.path.join(BASE, "reference.safetensors"))
    ids, mask = ref["input_ids"], ref["attention_mask"]
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100

    base = Qwen2ForCausalLM.from_pretrained(BASE, dtype=torch.float32, attn_implementation="eager")
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=TARGETS, r=8, lora_alpha=32,
                     lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(123)
    model = get_peft_model(base, cfg)
    model.train()  # dropout is 0, so train mode changes nothing but mirrors a training step
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    tensors = dict(input_ids=ids, attention_mask=mask, labels=labels,
                   logits=out.logits.detach().float(), loss=out.loss.detach().reshape(1))
    for name, p in model.named_parameters():
        if p.requires_grad:
            path = name.replace("base_model.model.", "", 1).replace(".default", "")
            tensors[f"grad.{path}"] = p.grad.detach().clone()
    tiny_trainable, tiny_all = counts(model)

    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    model.save_pretrained(OUT)
    for extra in ("README.md",):
        if os.path.exists(os.path.join(OUT, extra)):
            os.remove(os.path.join(OUT, extra))

    # Merged logits from a fresh load of what was saved (as a user would).
    base2 = Qwen2ForCausalLM.from_pretrained(BASE, dtype=torch.float32, attn_implementation="eager")
    merged = PeftModel.from_pretrained(base2, OUT).merge_and_unload().eval()
    with torch.no_grad():
        tensors["logits_merged"] = merged(input_ids=ids, attention_mask=mask).logits.float()
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "reference.safetensors"))

    info = {"tiny": {"trainable": tiny_trainable, "all": tiny_all}}
    cfg7 = os.path.join(SHARED, "qwen2.5-configs", "Qwen2.5-7B-Instruct")
    if os.path.isdir(cfg7):
        with torch.device("meta"):
            m7 = Qwen2ForCausalLM(AutoConfig.from_pretrained(cfg7))
        tut = LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=TARGETS, r=8, lora_alpha=32,
                         lora_dropout=0.1)
        p7 = get_peft_model(m7, tut)
        t, a = counts(p7)
        info["qwen2.5-7b-tutorial"] = {"trainable": t, "all": a,
                                       "line": f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}"}
    with open(os.path.join(OUT, "peft_reference.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info, indent=2), f"loss {out.loss.item():.6f}")


if __name__ == "__main__":
    main()
