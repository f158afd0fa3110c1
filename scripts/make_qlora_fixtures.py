#!/usr/bin/env python3
"""bitsandbytes' 4-bit quantization of seeded matrices: the reference kernels/src/quant.rs is tested
against (`crates/kernels/tests/quant_bnb.rs`).

Pinned environment:
    torch==2.15.0  transformers==5.24.0  bitsandbytes==0.50.2  numpy  safetensors==0.8.0
    (Python 3.11)

Run (from the repository root):
    .venv/bin/pip install torch==2.15.0 transformers==5.24.0 bitsandbytes==0.50.2 numpy \
        safetensors==0.8.0 && .venv/bin/python scripts/make_qlora_fixtures.py [--dump DIR]

Each case's input is generated from SplitMix64 in float32 (the same arithmetic in the Rust test):
element k uses z1, z2 = the (2k+1)-th and (2k+2)-th outputs of SplitMix64(seed),
u = (z1 >> 40) · 2⁻²⁴, v = (z2 >> 40) · 2⁻²⁴, x = (u − 0.5) · (0.01 + v·v), and the first 64 elements
are zero (a block whose scale is 0). For each case and each of nf4 / fp4, with and without double
quantization, `bitsandbytes.functional.quantize_4bit(x, blocksize=64, ...)` on the CPU gives the
packed bytes, the scales (plain; or the 8-bit scales, their block scales and the offset) and
`dequantize_4bit` to float32. `tests/fixtures/qlora/bnb.json` keeps their SHA-256 digests (and, for
the small case, the values); `--dump DIR` also writes every array as .npy.

Then transformers' QLoRA load of the f32 tiny fixtures (`from_pretrained(quantization_config=
BitsAndBytesConfig(load_in_4bit=True, ...))`, bitsandbytes' `Linear4bit` on the CPU) and its logits
on each fixture's reference inputs, computed as in training (the embeddings taking a gradient), for nf4 with double quantization and fp4 without:
`tests/fixtures/qlora/{fixture}-{nf4-dq,fp4}.safetensors`, with the model's memory footprint.
"""
import argparse
import hashlib
import json
import os

import numpy as np
import torch
import bitsandbytes.functional as F
import bitsandbytes

GAMMA = 0x9E3779B97F4A7C15
CASES = [("small", (37, 29), 7), ("qwen_mlp", (896, 4864), 11)]


def splitmix(seed, count):
    k = np.arange(1, count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + k * np.uint64(GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def matrix(shape, seed):
    n = shape[0] * shape[1]
    z = splitmix(seed, 2 * n)
    scale = np.float32(2.0 ** -24)
    u = (z[0::2] >> np.uint64(40)).astype(np.float32) * scale
    v = (z[1::2] >> np.uint64(40)).astype(np.float32) * scale
    x = (u - np.float32(0.5)) * (np.float32(0.01) + v * v)
    x[:64] = 0
    return x.reshape(shape)


def digest(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def main():
    # The offset of double quantization is torch's mean of the scales, whose last bit depends on
    # torch's thread count for more than 32768 of them; the Rust side follows one thread.
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump")
    a = ap.parse_args()
    out = {"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__, "cases": []}
    for name, shape, seed in CASES:
        x = matrix(shape, seed)
        for kind in ["nf4", "fp4"]:
            for double in [False, True]:
                q, st = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type=kind,
                                        compress_statistics=double)
                deq = F.dequantize_4bit(q, st).float().numpy()
                arrays = {"input": x, "packed": q.numpy().reshape(-1), "dequantized": deq}
                if double:
                    arrays["scales_q"] = st.absmax.numpy()
                    arrays["scales_absmax2"] = st.state2.absmax.numpy()
                    arrays["scales_offset"] = np.array([st.offset.item()], dtype=np.float32)
                    arrays["code"] = st.state2.code.numpy()
                else:
                    arrays["scales"] = st.absmax.numpy()
                case = {"name": name, "shape": list(shape), "seed": seed, "kind": kind,
                        "double": double,
                        "sha256": {k: digest(v) for k, v in arrays.items()}}
                if name == "small":
                    case["values"] = {k: v.reshape(-1).tolist() for k, v in arrays.items()
                                      if k != "input"}
                out["cases"].append(case)
                if a.dump:
                    os.makedirs(a.dump, exist_ok=True)
                    for k, v in arrays.items():
                        np.save(os.path.join(a.dump, f"{name}-{kind}-{int(double)}-{k}.npy"), v)
    out["transformers"] = transformers_logits()
    path = "tests/fixtures/qlora/bnb.json"
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}: {len(out['cases'])} cases, bitsandbytes {bitsandbytes.__version__}")


def transformers_logits():
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    footprints = {}
    for fixture in ["tiny-tied-f32", "tiny-untied-f32-sharded"]:
        d = f"tests/fixtures/{fixture}"
        ref = load_file(f"{d}/reference.safetensors")
        for tag, kind, double in [("nf4-dq", "nf4", True), ("fp4", "fp4", False)]:
            cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind,
                                     bnb_4bit_use_double_quant=double,
                                     bnb_4bit_compute_dtype=torch.float32)
            # Eager attention, as the fixtures' references (it differs from sdpa only on the
            # padded rows' fully masked queries).
            m = AutoModelForCausalLM.from_pretrained(d, quantization_config=cfg, device_map="cpu",
                                                     dtype=torch.float32,
                                                     attn_implementation="eager")
            assert type(m.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
            # With the input taking a gradient, as in QLoRA training, `Linear4bit` runs
            # `dequantize_4bit` + `linear` (without one, bitsandbytes' CPU inference path repacks the
            # weights with bf16 scales, which is lossy).
            embeds = m.model.embed_tokens(ref["input_ids"]).detach().requires_grad_(True)
            logits = m(inputs_embeds=embeds, attention_mask=ref["attention_mask"]).logits.detach()
            save_file({"logits": logits.contiguous()}, f"tests/fixtures/qlora/{fixture}-{tag}.safetensors")
            footprints[f"{fixture}-{tag}"] = m.get_memory_footprint()
    return {"memory_footprint": footprints}


if __name__ == "__main__":
    main()
