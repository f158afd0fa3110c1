#!/usr/bin/env python3
"""Writes PEFT references for LoRA's variants under tests/fixtures/peft-<variant>/.

Pinned environment (the versions these fixtures were generated with):
    torch==2.15.0  transformers==5.24.0  peft==0.21.2  safetensors==0.8.0  (Python 3.11)

Regenerate (from the repository root, after scripts/make_fixtures.py):
    .venv/bin/python scripts/make_variant_fixtures.py [variant ...]

On the base checkpoint tests/fixtures/tiny-untied-f32-sharded, one PEFT adapter per variant, r=8,
alpha=32, dropout 0, init_lora_weights=False (A and B random), then every extra parameter moved off
its initial value (seeded) so that it matters:
    peft-dora       use_dora=True on q,k,v,o,gate,up,down; lora_magnitude_vector scaled by 1 + N(0, 0.1)
    peft-lora-bias  lora_bias=True on q,k,v (the projections with a base bias, so it can be merged);
                    every lora_B.bias ~ N(0, 0.1)
    peft-pissa      init_lora_weights="pissa" on all seven (the base becomes the residual), then
    peft-olora      "olora"; every lora_A / lora_B moved by N(0, 0.02) (as training would)
    peft-modules-to-save  modules_to_save=["lm_head", "embed_tokens"] on the seven; both copies moved
                    by N(0, 0.02)
    peft-trainable-tokens       trainable_token_indices=[1, 5, 7, 200] on the seven, the rows moved
                                by N(0, 0.05)
    peft-trainable-tokens-tied  the same on tests/fixtures/tiny-tied-f32 (ids 3, 9, 250): the tied
                                head reads the trained rows too
Each directory holds PEFT's save_pretrained output and reference.safetensors:
    input_ids, attention_mask, labels  [3, 10]  (as tests/fixtures/peft-tiny-untied)
    logits         [3, 10, vocab]  PeftModel forward in train mode (float32, eager attention)
    logits_merged  [3, 10, vocab]  after merge_and_unload of a fresh load of the saved adapter
    merged.<key>   a few weights of that merged model (MERGED_KEYS)
    logits_4bit    (DoRA only) the adapter on transformers' bitsandbytes NF4 load of the base
                   (double quantization, float32 compute; bitsandbytes==0.50.2)
    loss           [1]             transformers' causal-LM loss
    grad.<path>    the gradient of every trainable parameter, keyed by our module path
and peft_reference.json the print_trainable_parameters numbers of the tiny model and of the real
Qwen2.5-7B-Instruct config (meta device) with the tutorial's targets and this variant.
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, Qwen2ForCausalLM
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BASE = os.path.join("tests", "fixtures", "tiny-untied-f32-sharded")
SHARED = os.environ.get("FERROLORA_SHARED_DATA", os.path.join("..", "shared", "data"))
# Weights of the merged model stored for comparison (merge_and_unload's own values).
MERGED_KEYS = ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight",
               "model.layers.0.self_attn.q_proj.bias", "model.embed_tokens.weight", "lm_head.weight"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "dora": dict(target_modules=ALL, use_dora=True),
    "lora-bias": dict(target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True),
    "pissa": dict(target_modules=ALL, init_lora_weights="pissa"),
    "olora": dict(target_modules=ALL, init_lora_weights="olora"),
    "modules-to-save": dict(target_modules=ALL, modules_to_save=["lm_head", "embed_tokens"]),
    "trainable-tokens": dict(target_modules=ALL, trainable_token_indices=[1, 5, 7, 200]),
    "trainable-tokens-tied": dict(base=os.path.join("tests", "fixtures", "tiny-tied-f32"),
                                  target_modules=ALL, trainable_token_indices=[3, 9, 250]),
}


def counts(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def perturb(model, seed, init):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("lora_B.default.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif ".modules_to_save." in name or "trainable_tokens_delta" in name:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
            elif init and ("lora_A" in name or "lora_B" in name):
                p.add_(0.02 * torch.randn(p.shape, generator=g))


def main():
    os.chdir(ROOT)
    only = set(sys.argv[1:])
    for seed, (name, kw) in enumerate(VARIANTS.items()):
        if only and name not in only:
            continue
        kw = dict(kw)
        base_dir = kw.pop("base", BASE)
        ref = load_file(os.path.join(base_dir, "reference.safetensors"))
        ids, mask = ref["input_ids"], ref["attention_mask"]
        labels = ids.clone()
        labels[:, :4] = -100
        labels[mask == 0] = -100
        out_dir = os.path.join("tests", "fixtures", f"peft-{name}")
        base = Qwen2ForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
        cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=32, lora_dropout=0.0,
                         **dict(dict(init_lora_weights=False), **kw))
        torch.manual_seed(123 + seed)
        model = get_peft_model(base, cfg)
        perturb(model, 7 + seed, "init_lora_weights" in kw)
        model.train()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        tensors = dict(input_ids=ids, attention_mask=mask, labels=labels,
                       logits=out.logits.detach().float(), loss=out.loss.detach().reshape(1))
        for pname, p in model.named_parameters():
            if p.requires_grad:
                path = (pname.replace("base_model.model.", "", 1)
                        .replace(".modules_to_save.default", "").replace(".default", ""))
                tensors[f"grad.{path}"] = p.grad.detach().clone()
        tiny_trainable, tiny_all = counts(model)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        model.save_pretrained(out_dir)
        if os.path.exists(os.path.join(out_dir, "README.md")):
            os.remove(os.path.join(out_dir, "README.md"))
        base2 = Qwen2ForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
        merged = PeftModel.from_pretrained(base2, out_dir).merge_and_unload().eval()
        with torch.no_grad():
            tensors["logits_merged"] = merged(input_ids=ids, attention_mask=mask).logits.float()
        if name == "dora":
            # QLoRA + DoRA: the same adapter on transformers' bitsandbytes NF4 load (double
            # quantization, float32 compute), as tests/qlora.rs loads the base.
            from transformers import BitsAndBytesConfig
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
            base4 = Qwen2ForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager",
                                                     quantization_config=q, device_map="cpu")
            m4 = PeftModel.from_pretrained(base4, out_dir).eval()
            with torch.no_grad():
                tensors["logits_4bit"] = m4(input_ids=ids, attention_mask=mask).logits.float()
        state = merged.state_dict()
        for key in MERGED_KEYS:
            if key in state:
                tensors[f"merged.{key}"] = state[key].detach().clone()
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  os.path.join(out_dir, "reference.safetensors"))

        info = {"tiny": {"trainable": tiny_trainable, "all": tiny_all}}
        cfg7 = os.path.join(SHARED, "qwen2.5-configs", "Qwen2.5-7B-Instruct")
        if os.path.isdir(cfg7):
            with torch.device("meta"):
                m7 = Qwen2ForCausalLM(AutoConfig.from_pretrained(cfg7))
            kw7 = dict(kw, target_modules=ALL)
            kw7.pop("init_lora_weights", None)  # no SVD of meta tensors: the counts do not change
            p7 = get_peft_model(m7, LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=32,
                                               lora_dropout=0.1, **kw7))
            t, a = counts(p7)
            info["qwen2.5-7b-tutorial"] = {
                "trainable": t, "all": a,
                "line": f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}"}
        with open(os.path.join(out_dir, "peft_reference.json"), "w") as f:
            json.dump(info, f, indent=2)
        print(name, json.dumps(info), f"loss {out.loss.item():.6f}")


if __name__ == "__main__":
    main()
