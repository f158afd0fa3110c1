"""Writes the fuzz seed corpus (fuzz/seeds/<target>/) and the valid files the targets load next
to fuzzed ones (fuzz/fixtures/: two shards of the tiny model of fixtures/config.json, and an
adapter for it). Standard library only.

Run from the repository root: python3 fuzz/make_seeds.py
Each seed starts with the selector byte its target documents, except model_config's (no selector).
Seeds named regress-* are inputs that crashed a target before a fix, kept as found.
"""

import json
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
FIX = ROOT / "tests" / "fixtures"

# The tiny model of fuzz_targets/safetensors_header.rs: vocab 8, hidden 4, intermediate 8,
# 1 layer, 2 heads of 2, 1 KV head, tied embeddings.
L = "model.layers.0."
SHAPES = {
    "model.embed_tokens.weight": [8, 4],
    L + "input_layernorm.weight": [4],
    L + "self_attn.q_proj.weight": [4, 4],
    L + "self_attn.q_proj.bias": [4],
    L + "self_attn.k_proj.weight": [2, 4],
    L + "self_attn.k_proj.bias": [2],
    L + "self_attn.v_proj.weight": [2, 4],
    L + "self_attn.v_proj.bias": [2],
    L + "self_attn.o_proj.weight": [4, 4],
    L + "mlp.gate_proj.weight": [8, 4],
    L + "mlp.up_proj.weight": [8, 4],
    L + "mlp.down_proj.weight": [4, 8],
    L + "post_attention_layernorm.weight": [4],
    "model.norm.weight": [4],
}
SIZE = {"F32": 4, "BF16": 2, "F16": 2}


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def safetensors(names, dtype="F32", extra=None):
    """A valid file: the tensors in name order, element i of each = i / 100."""
    tensors = {k: (dtype, SHAPES[k]) for k in names}
    tensors.update(extra or {})
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name in sorted(tensors):
        dt, shape = tensors[name]
        values = [i / 100 for i in range(numel(shape))]
        if dt == "F32":
            raw = b"".join(struct.pack("<f", v) for v in values)
        elif dt == "BF16":
            raw = b"".join(struct.pack("<f", v)[2:] for v in values)
        else:
            raw = b"".join(struct.pack("<e", v) for v in values)
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data, h, len(data)


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def main():
    names = sorted(SHAPES)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    write(FUZZ / "fixtures" / "model-00001-of-00002.safetensors", safetensors(first)[0])
    write(FUZZ / "fixtures" / "model-00002-of-00002.safetensors", safetensors(second)[0])

    st = FUZZ / "seeds" / "safetensors_header"
    inv_freq = {L + "self_attn.rotary_emb.inv_freq": ("F32", [1])}
    write(st / "single-f32", b"\x00" + safetensors(names)[0])
    write(st / "single-bf16-as-bf16", b"\x03" + safetensors(names, "BF16")[0])
    write(st / "single-f16-inv-freq-as-f32", b"\x00" + safetensors(names, "F16", inv_freq)[0])
    _, header, n = safetensors(names)
    write(st / "header-f32", b"\x01" + struct.pack("<H", n) + header)
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in second})
    index = {"metadata": {"total_size": 4 * sum(numel(SHAPES[k]) for k in names)}, "weight_map": weight_map}
    write(st / "index", b"\x02" + json.dumps(index, indent=2).encode())

    ds = FUZZ / "seeds" / "dataset_record"
    data = FIX / "data"
    write(ds / "alpaca-history-detect", b"\x00" + (data / "alpaca_history.jsonl").read_bytes())
    write(ds / "alpaca-forced", b"\x01" + (data / "alpaca_history.jsonl").read_bytes())
    write(ds / "sharegpt-array", b"\x02" + (data / "chat_sharegpt.json").read_bytes())
    write(ds / "messages-detect", b"\x00" + (data / "chat_messages.jsonl").read_bytes())
    write(ds / "messages-forced", b"\x03" + (data / "chat_messages.jsonl").read_bytes())
    example = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "attention_mask": [1, 1, 1]}
    write(ds / "prepared", b"\x04" + (json.dumps(example) + "\n").encode())

    mc = FUZZ / "seeds" / "model_config"
    write(mc / "tiny-tied-f32", (FIX / "tiny-tied-f32" / "config.json").read_bytes())
    write(mc / "tiny-untied-bf16", (FIX / "tiny-untied-bf16" / "config.json").read_bytes())
    # Qwen2.5-7B-Instruct's shape in the transformers 4.x layout (eos as a list, rope_scaling null).
    qwen7b = {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
              "eos_token_id": [151645, 151643], "hidden_act": "silu", "hidden_size": 3584,
              "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
              "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
              "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
              "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 131072,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
              "vocab_size": 152064}
    write(mc / "qwen2.5-7b-4x", json.dumps(qwen7b, indent=2).encode())

    # The adapter the adapter_config target loads in mode 1: r = 2 on q_proj and v_proj.
    lora = {}
    for proj, out in (("q_proj", 4), ("v_proj", 2)):
        key = "base_model.model." + L + "self_attn." + proj
        lora[key + ".lora_A.weight"] = ("F32", [2, 4])
        lora[key + ".lora_B.weight"] = ("F32", [out, 2])
    write(FUZZ / "fixtures" / "adapter_model.safetensors", safetensors([], extra=lora)[0])

    ac = FUZZ / "seeds" / "adapter_config"
    write(ac / "peft-0.21", b"\x00" + (FIX / "peft-tiny-untied" / "adapter_config.json").read_bytes())
    write(ac / "ours", b"\x00" + (FIX / "rust-adapter-tiny-tied" / "adapter_config.json").read_bytes())
    tiny = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4,
            "target_modules": ["q_proj", "v_proj"], "bias": "none", "lora_dropout": 0.0}
    write(ac / "load-tiny", b"\x01" + json.dumps(tiny, indent=2).encode())
    patterns = {"r": 4, "lora_alpha": 16, "target_modules": "model\\.layers\\.\\d+\\.self_attn\\.(q|v)_proj",
                "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"layers\\.11\\..*": 8},
                "layers_to_transform": [0, 11], "layers_pattern": "layers", "use_rslora": True,
                "init_lora_weights": "gaussian", "exclude_modules": ["lm_head"]}
    write(ac / "patterns", b"\x00" + json.dumps(patterns, indent=2).encode())


if __name__ == "__main__":
    main()
