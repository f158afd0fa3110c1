#!/usr/bin/env python3
"""Writes the tiny Qwen2 reference fixtures under tests/fixtures/ (checkpoints + transformers outputs).

Pinned environment (the versions these fixtures were generated with):
    torch==2.15.0  transformers==5.24.0  safetensors==0.8.0  (Python 3.11)

Regenerate (from the repository root):
    python3 -m venv .venv && .venv/bin/pip install torch==2.15.0 transformers==5.24.0 safetensors==0.8.0 \
        && .venv/bin/python scripts/make_fixtures.py

Each fixture directory is a Hugging Face model directory (config.json + model.safetensors, or two
shards + model.safetensors.index.json) plus `reference.safetensors` with the inputs and the outputs of
transformers' Qwen2ForCausalLM (eager attention, float32 compute):
    input_ids, attention_mask   [3, 10]  row 0 unpadded, row 1 right-padded, row 2 left-padded
    position_ids                [3, 10]  as `generate` derives them from the mask (cumsum - 1, pads 1)
    logits                      [3, 10, vocab]  forward(input_ids, attention_mask)
    logits_pos                  [3, 10, vocab]  forward(input_ids, attention_mask, position_ids)
    hidden                      [3, 10, hidden] last hidden state (after the final norm)
    logits_bf16                 [3, 10, vocab]  bf16 checkpoints only: the same forward in bfloat16
Weights are random (seeded) with a larger spread than HF's init, so logits are far from uniform.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")

SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             rope_theta=1e6, rms_norm_eps=1e-6)

# name: (tied, dtype, shards)
FIXTURES = {
    "tiny-tied-f32": (True, torch.float32, 1),
    "tiny-untied-f32-sharded": (False, torch.float32, 2),
    "tiny-tied-bf16-sharded": (True, torch.bfloat16, 2),
    "tiny-untied-bf16": (False, torch.bfloat16, 1),
}


def build(seed, tied):
    torch.manual_seed(seed)
    cfg = Qwen2Config(tie_word_embeddings=tied, attn_implementation="eager", **SHAPE)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def inputs(vocab):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, vocab, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0   # right padding
    mask[2, :4] = 0   # left padding
    ids[mask == 0] = 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, pos


def save_sharded(model, out, dtype, shards):
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    keys = sorted(sd)
    parts = [keys[i::shards] for i in range(shards)] if shards > 1 else [keys]
    weight_map = {}
    total = 0
    for i, part in enumerate(parts):
        fname = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in part}, os.path.join(out, fname), metadata={"format": "pt"})
        for k in part:
            weight_map[k] = fname
            total += sd[k].numel() * sd[k].element_size()
    if shards > 1:
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def main():
    for seed, (name, (tied, dtype, shards)) in enumerate(FIXTURES.items()):
        out = os.path.join(ROOT, name)
        os.makedirs(out, exist_ok=True)
        for f in os.listdir(out):
            os.remove(os.path.join(out, f))
        model = build(seed, tied)
        model.config.torch_dtype = dtype
        model.config.save_pretrained(out)
        save_sharded(model, out, dtype, shards)
        # Reload exactly what was written, in float32, as a user would.
        ref = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
        ids, mask, pos = inputs(ref.config.vocab_size)
        with torch.no_grad():
            o = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            o_pos = ref(input_ids=ids, attention_mask=mask, position_ids=pos)
            tensors = dict(input_ids=ids, attention_mask=mask, position_ids=pos,
                           logits=o.logits.float(), logits_pos=o_pos.logits.float(),
                           hidden=o.hidden_states[-1].float())
            if dtype == torch.bfloat16:
                half = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.bfloat16,
                                                        attn_implementation="eager").eval()
                tensors["logits_bf16"] = half(input_ids=ids, attention_mask=mask).logits.float()
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "reference.safetensors"))
        n = sum(p.numel() for p in ref.parameters())
        print(f"{name}: {n} params, logits std {o.logits.std():.3f}", file=sys.stderr)


if __name__ == "__main__":
    main()
