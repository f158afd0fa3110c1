#!/usr/bin/env python3
"""Writes the training-loop reference under tests/fixtures/train-tiny/: 10 optimizer steps in PyTorch.

Pinned environment (the versions these fixtures were generated with):
    torch==2.15.0  transformers==5.24.0  peft==0.21.2  safetensors==0.8.0  (Python 3.11)
    bitsandbytes==0.50.2 (the QLoRA run)

Regenerate (from the repository root, after scripts/make_fixtures.py and make_lora_fixtures.py):
    .venv/bin/python scripts/make_train_fixtures.py

The loop is transformers' Trainer arithmetic for a PEFT model, written out so every choice is visible:
base tests/fixtures/tiny-untied-f32-sharded + the PEFT adapter tests/fixtures/peft-tiny-untied
(dropout 0), 12 fixed examples (examples.json), no shuffle, per-device batch 2, gradient accumulation
2 (one optimizer step = 4 examples; 3 steps an epoch), right padding with pad id 0 and labels -100
(DataCollatorForSeq2Seq), each micro-batch's summed token loss divided by the supervised tokens of
the whole step (transformers >= 4.46, `num_items_in_batch`), clip_grad_norm_(1.0) over all adapter
gradients, torch.optim.AdamW(lr 1e-3, betas 0.9/0.999, eps 1e-8, weight_decay 0), and
get_linear_schedule_with_warmup(2 warmup steps, 10 total). Writes reference.safetensors:
    loss            [10]  mean token loss of each optimizer step (before its update)
    grad_norm       [10]  global gradient norm before clipping
    final.<path>    every lora_A / lora_B after the 10th step, keyed by our module path

Then the same 10 steps as QLoRA: the base loaded by transformers with
BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
bnb_4bit_compute_dtype=float32) (bitsandbytes' Linear4bit on the CPU: dequantize + linear, the input
gradient through the dequantized weight), the same adapter on it: qlora-losses.json and
qlora-reference.safetensors. And the same 10 steps with LoRA+ (PEFT's create_loraplus_optimizer,
loraplus_lr_ratio 16: every lora_B at 16× the learning rate): loraplus-losses.json and
loraplus-reference.safetensors. And the same 10 steps from the DoRA and lora_bias adapters of
scripts/make_variant_fixtures.py (tests/fixtures/peft-dora, peft-lora-bias, peft-modules-to-save, peft-trainable-tokens,
peft-pissa, peft-olora; loading the last two re-runs their init on the base):
dora-*, lora-bias-*, modules-to-save-*, trainable-tokens-*, pissa-* and olora-* files (the final values include every
lora_magnitude_vector, lora_B.bias, the trained lm_head and embed_tokens, and the trained token rows).

With arguments, only the named runs are written (e.g. `make_train_fixtures.py dora lora-bias`).
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import save_file
from transformers import Qwen2ForCausalLM, get_linear_schedule_with_warmup

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BASE = os.path.join("tests", "fixtures", "tiny-untied-f32-sharded")
ADAPTER = os.path.join("tests", "fixtures", "peft-tiny-untied")
OUT = os.path.join("tests", "fixtures", "train-tiny")
STEPS, BS, ACCUM, LR, WARMUP, MAX_NORM = 10, 2, 2, 1e-3, 2, 1.0
LORAPLUS = 16.0


def examples():
    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(12):
        n = 6 + (i * 5) % 9
        ids = torch.randint(1, 256, (n,), generator=g).tolist()
        labels = [-100 if j < 3 else t for j, t in enumerate(ids)]
        out.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * n})
    return out


def collate(batch):
    seq = max(len(e["input_ids"]) for e in batch)
    pad = lambda v, x: v + [x] * (seq - len(v))
    ids = torch.tensor([pad(e["input_ids"], 0) for e in batch])
    mask = torch.tensor([pad(e["attention_mask"], 0) for e in batch])
    labels = torch.tensor([pad(e["labels"], -100) for e in batch])
    return ids, mask, labels


def loss_sum(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")


def main():
    os.chdir(ROOT)
    os.makedirs(OUT, exist_ok=True)
    data = examples()
    only = set(sys.argv[1:])
    want = lambda name: not only or name in only
    with open(os.path.join(OUT, "examples.json"), "w") as f:
        json.dump(data, f)
    load = lambda: Qwen2ForCausalLM.from_pretrained(BASE, dtype=torch.float32, attn_implementation="eager")
    if want("f32"):
        run(data, load(), "")
    if want("qlora"):
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        base = Qwen2ForCausalLM.from_pretrained(BASE, dtype=torch.float32, attn_implementation="eager",
                                                quantization_config=q, device_map="cpu")
        assert type(base.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
        run(data, base, "qlora-")
    if want("loraplus"):
        run(data, load(), "loraplus-", loraplus_lr_ratio=LORAPLUS)
    for variant in ("dora", "lora-bias", "modules-to-save", "trainable-tokens", "pissa", "olora"):
        if want(variant):
            run(data, load(), f"{variant}-", adapter=os.path.join("tests", "fixtures", f"peft-{variant}"))


def run(data, base, prefix, loraplus_lr_ratio=None, adapter=ADAPTER):
    model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if loraplus_lr_ratio is None:
        opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    else:
        from peft.optimizers import create_loraplus_optimizer

        opt = create_loraplus_optimizer(model=model, optimizer_cls=torch.optim.AdamW, lr=LR,
                                        loraplus_lr_ratio=loraplus_lr_ratio, betas=(0.9, 0.999),
                                        eps=1e-8, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, WARMUP, STEPS)
    micro = [data[i:i + BS] for i in range(0, len(data), BS)]  # sequential, 6 micro-batches an epoch
    losses, norms, k = [], [], 0
    for _ in range(STEPS):
        group = [micro[(k + j) % len(micro)] for j in range(ACCUM)]
        k += ACCUM
        n_sup = sum(sum(1 for l in e["labels"][1:] if l != -100) for b in group for e in b)
        total = 0.0
        for b in group:
            loss = loss_sum(model, *collate(b)) / n_sup
            loss.backward()
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        norms.append(norm.item())
    tensors = {"loss": torch.tensor(losses, dtype=torch.float64).float(),
               "grad_norm": torch.tensor(norms).float()}
    for name, p in model.named_parameters():
        if p.requires_grad:
            path = (name.replace("base_model.model.", "", 1)
                    .replace(".modules_to_save.default", "").replace(".default", ""))
            tensors[f"final.{path}"] = p.detach().clone()
    # Losses in f64 text too: the f32 tensor above rounds them.
    with open(os.path.join(OUT, f"{prefix}losses.json"), "w") as f:
        json.dump({"loss": losses, "grad_norm": norms}, f, indent=1)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(OUT, f"{prefix}reference.safetensors"))
    print(prefix or "f32 ", "losses", [round(x, 5) for x in losses])
    print("grad norms", [round(x, 4) for x in norms])


if __name__ == "__main__":
    main()
