#!/usr/bin/env python3
"""Checks `cargo xtask export` against llama.cpp itself: its `gguf` reader and its runtime.

Pinned environment (made by this script in .venv-gguf on first run; llama-cpp-python builds
llama.cpp from source there, several minutes on two cores):
    gguf==0.19.0  llama-cpp-python==0.3.36  numpy==2.4.6  (Python 3.11)

Run (from anywhere; builds and runs the commands itself):
    python3 scripts/check_gguf.py

It needs the project's shared data (Qwen2.5's tokenizer): ../shared/data beside the repository,
or FERROLORA_SHARED_DATA.

1. Fixture, in a temporary directory: a tiny random Qwen2 (hidden 64, 2 layers, 4 heads / 2 KV
   heads, q/k/v biases) with Qwen2.5's real vocabulary (151936 ids) and tokenizer files, untied and
   tied, and a random PEFT adapter on all seven projections (r 8, alpha 16).
2. `cargo xtask finetune` trains a second adapter on the Huanhuan data (4 steps, learning rate
   0.01: the user's path). `cargo xtask export`: the base (f32), the merged model (f32, f16, bf16,
   q8_0), the adapter alone (`--format gguf-lora`, f32), the tied base (f32), and the finetuned
   adapter merged and alone (f32).
3. The `gguf` package reads every file back: every metadata key against config.json and the
   tokenizer files, every tensor's name, shape and type; f32 data against the merge done here in
   numpy (W + alpha/r * B @ A); f16/bf16/q8_0 bytes against `gguf.quants.quantize` of the f32
   export's data (must be identical); the adapter's A and B against the PEFT file.
4. llama.cpp (llama-cpp-python) loads each file. For the f32 files its tokenization of the chat
   prompt and its greedy 32-token continuation must equal `cargo xtask chat --greedy` token for
   token: base, merged (adapter folded in), base + `--lora` adapter, tied, and both for the
   finetuned adapter. For f16/bf16/q8_0 the
   first-token logits must lie within the tolerances below of ours (and the continuation is
   reported).
Exits non-zero when any check fails.
"""
import json
import os
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
VENV = os.path.join(ROOT, ".venv-gguf")
PINS = ["gguf==0.19.0", "numpy==2.4.6", "llama-cpp-python==0.3.36"]

# Max |logit difference| to our f32 logits, relative to max |logit|, for the first token. f32:
# summation order only (llama.cpp run with an f32 KV cache). The others round every weight
# (relative rms: f16 ~2^-12, bf16 ~2^-9, q8_0 ~max|w|/127/sqrt(12) per block of 32) and, for
# q8_0, llama.cpp also rounds the activations to q8_0 blocks in each product; this fixture's random
# weights (std 0.2, width 64) amplify each layer's error, so the bounds are loose by design; the
# bytes themselves are checked exactly against gguf's quantizer above.
TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "bf16": 5e-2, "q8_0": 1e-1}
PROMPT = "Who are you, and what is the capital of France?"
NEW_TOKENS = 32


def ensure_venv():
    """Re-runs this script inside .venv-gguf, creating it with the pinned packages if needed."""
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        return
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        env = dict(os.environ, CMAKE_ARGS=os.environ.get("CMAKE_ARGS", "-DGGML_NATIVE=OFF"))
        subprocess.run([py, "-m", "pip", "install", "-q", *PINS], check=True, env=env)
    os.execv(py, [py, os.path.abspath(__file__), *sys.argv[1:]])


ensure_venv()

import numpy as np  # noqa: E402
import gguf  # noqa: E402
from gguf import GGUFReader, GGMLQuantizationType as QT  # noqa: E402
import llama_cpp  # noqa: E402

FAILS = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        FAILS.append(what)


def shared_tokenizer():
    base = os.environ.get("FERROLORA_SHARED_DATA") or os.path.join(ROOT, "..", "shared", "data")
    d = os.path.join(base, "qwen2.5-tokenizer")
    if not os.path.isfile(os.path.join(d, "tokenizer.json")):
        sys.exit(f"no Qwen2.5 tokenizer in {d}: set FERROLORA_SHARED_DATA")
    return d


# ---------------------------------------------------------------- fixture

def write_safetensors(path, tensors):
    header, off, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for k, v in tensors.items():
        b = np.ascontiguousarray(v, dtype=np.float32).tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)


H, I, L, NH, NKV, V, R, ALPHA = 64, 128, 2, 4, 2, 151936, 8, 16
PROJ = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (H // NH * NKV, H),
        "self_attn.v_proj": (H // NH * NKV, H), "self_attn.o_proj": (H, H),
        "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}


def make_model(d, tok_dir, tied, seed):
    rng = np.random.default_rng(seed)
    n = lambda *s, std=0.2: (rng.standard_normal(s) * std).astype(np.float32)  # noqa: E731
    w = {"model.embed_tokens.weight": n(V, H, std=0.5)}
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + n(H, std=0.1)
        w[p + "post_attention_layernorm.weight"] = 1 + n(H, std=0.1)
        for m, (o, k) in PROJ.items():
            w[p + m + ".weight"] = n(o, k)
            if m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                w[p + m + ".bias"] = n(o, std=0.1)
    w["model.norm.weight"] = 1 + n(H, std=0.1)
    if not tied:
        w["lm_head.weight"] = n(V, H)
    os.makedirs(d)
    write_safetensors(os.path.join(d, "model.safetensors"), w)
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
           "hidden_size": H, "intermediate_size": I, "num_hidden_layers": L,
           "num_attention_heads": NH, "num_key_value_heads": NKV, "vocab_size": V,
           "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
           "tie_word_embeddings": tied, "bos_token_id": 151643,
           # Qwen2.5-Instruct's stop tokens; the seed template ends answers with <|endoftext|>.
           "eos_token_id": [151645, 151643],
           "use_sliding_window": False, "torch_dtype": "float32"}
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"), indent=2)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        with open(os.path.join(tok_dir, f), "rb") as src, open(os.path.join(d, f), "wb") as dst:
            dst.write(src.read())
    return w, cfg


def make_adapter(d, seed):
    rng = np.random.default_rng(seed)
    t = {}
    for i in range(L):
        for m, (o, k) in PROJ.items():
            key = f"base_model.model.model.layers.{i}.{m}"
            t[key + ".lora_A.weight"] = (rng.standard_normal((R, k)) * 0.2).astype(np.float32)
            t[key + ".lora_B.weight"] = (rng.standard_normal((o, R)) * 0.2).astype(np.float32)
    os.makedirs(d)
    write_safetensors(os.path.join(d, "adapter_model.safetensors"), t)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": ALPHA,
           "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
           "use_dora": False, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
           "target_modules": [m.split(".")[1] for m in PROJ], "base_model_name_or_path": "tiny"}
    json.dump(cfg, open(os.path.join(d, "adapter_config.json"), "w"), indent=2)
    return t


def merged_weights(w, a):
    out = dict(w)
    for k in w:
        mod = k[: -len(".weight")]
        ka = f"base_model.model.{mod}.lora_A.weight"
        if k.endswith(".weight") and ka in a:
            kb = f"base_model.model.{mod}.lora_B.weight"
            out[k] = (w[k] + np.float32(ALPHA / R) * (a[kb] @ a[ka])).astype(np.float32)
    return out


GGUF_NAME = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(k):
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}
    if k in top:
        return top[k]
    _, _, i, rest = k.split(".", 3)
    mod, param = rest.rsplit(".", 1)
    return f"blk.{i}.{GGUF_NAME[mod]}.{param}"


# ---------------------------------------------------------------- gguf reader checks

def field(r, key):
    f = r.fields.get(key)
    return None if f is None else f.contents()


def expected_tokenizer(tok_dir):
    tj = json.load(open(os.path.join(tok_dir, "tokenizer.json")))
    tc = json.load(open(os.path.join(tok_dir, "tokenizer_config.json")))
    toks, types = [f"[PAD{i}]" for i in range(V)], [5] * V
    for t, i in tj["model"]["vocab"].items():
        toks[i], types[i] = t, 1
    for a in tj["added_tokens"]:
        c = a["content"]
        look = c.startswith("<|") and c.endswith("|>")
        toks[a["id"]], types[a["id"]] = c, 3 if a["special"] or look else 4
    merges = tj["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return toks, types, merges, tc


def check_model_file(path, cfg, weights, dtype, tok_dir):
    r = GGUFReader(path)
    name = os.path.basename(path)
    want = {"general.architecture": "qwen2", "general.type": "model",
            "general.file_type": {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[dtype],
            "qwen2.block_count": L, "qwen2.context_length": 512, "qwen2.embedding_length": H,
            "qwen2.feed_forward_length": I, "qwen2.attention.head_count": NH,
            "qwen2.attention.head_count_kv": NKV, "qwen2.rope.freq_base": 1e6,
            "qwen2.attention.layer_norm_rms_epsilon": np.float32(1e-6),
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
            "tokenizer.ggml.bos_token_id": 151643, "tokenizer.ggml.eos_token_id": 151645,
            "tokenizer.ggml.padding_token_id": 151643, "tokenizer.ggml.add_bos_token": False}
    toks, types, merges, tc = expected_tokenizer(tok_dir)
    want["tokenizer.chat_template"] = tc["chat_template"]
    bad = [k for k, v in want.items() if field(r, k) != v]
    check(not bad, f"{name}: metadata {len(want)} keys as expected"
          + (f"; differ: {[(k, field(r, k), want[k]) for k in bad]}" if bad else ""))
    check(field(r, "tokenizer.ggml.tokens") == toks and field(r, "tokenizer.ggml.token_type") == types
          and field(r, "tokenizer.ggml.merges") == merges,
          f"{name}: {V} tokens, token types and {len(merges)} merges equal tokenizer.json's")
    # Every key was decoded by the reader; report the count.
    print(f"      {name}: {len(r.fields)} fields, {len(r.tensors)} tensors, "
          f"alignment {r.alignment}, data offset {r.data_offset}")
    names = {gguf_name(k): k for k in weights}
    check({t.name for t in r.tensors} == set(names),
          f"{name}: tensor names are llama.cpp's ({len(names)})")
    qt = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0}[dtype]
    max_err, types_seen = 0.0, {}
    for t in r.tensors:
        ref = weights[names[t.name]]
        shape_ok = list(reversed([int(x) for x in t.shape])) == list(ref.shape)
        want_t = QT.F32 if ref.ndim == 1 else qt
        types_seen[t.tensor_type.name] = types_seen.get(t.tensor_type.name, 0) + 1
        if not shape_ok or t.tensor_type != want_t:
            check(False, f"{name}: {t.name} shape {list(t.shape)} type {t.tensor_type.name}")
            continue
        if want_t == QT.F32:
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape)
            max_err = max(max_err, float(np.abs(got - ref).max()))
        else:
            # Our encoding of our f32 merge must equal gguf's own quantizer on the same values.
            exact = gguf.quants.quantize(ref, want_t)
            if not np.array_equal(np.frombuffer(t.data.tobytes(), np.uint8),
                                  np.frombuffer(exact.tobytes(), np.uint8)):
                check(False, f"{name}: {t.name} bytes differ from gguf.quants.quantize")
    print(f"      {name}: tensor types {types_seen}")
    return r, max_err


# ---------------------------------------------------------------- runtimes

def ours(xtask, model, adapter=None):
    cmd = [xtask, "chat", "--model", model, "--greedy", "--prompt", PROMPT,
           "--max-new-tokens", str(NEW_TOKENS), "--debug-json"]
    if adapter:
        cmd += ["--adapter", adapter]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("{\"")][-1]
    d = json.loads(line)
    return d["prompt_ids"], d["generated_ids"], np.array(d["first_logits"], np.float32)


def llama(path, prompt_ids, lora=None):
    # An f32 KV cache (llama.cpp's default is f16, which alone moves logits by ~1e-3).
    llm = llama_cpp.Llama(model_path=path, lora_path=lora, n_ctx=256, n_batch=256, n_threads=2,
                          logits_all=True, verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32)
    text = llm.detokenize(prompt_ids, special=True)
    toks = llm.tokenize(text, add_bos=False, special=True)
    eos = {151643, 151645}
    llm.reset()
    llm.eval(prompt_ids)
    first = np.array(llm.scores[llm.n_tokens - 1], np.float32)
    out = []
    for _ in range(NEW_TOKENS):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        if t in eos:
            break
        llm.eval([t])
    return toks, out, first


def main():
    tok_dir = shared_tokenizer()
    subprocess.run(["cargo", "build", "--release", "-p", "xtask"], check=True, cwd=ROOT)
    xtask = os.path.join(ROOT, "target", "release", "xtask")
    with tempfile.TemporaryDirectory() as tmp:
        j = lambda *p: os.path.join(tmp, *p)  # noqa: E731
        w, cfg = make_model(j("base"), tok_dir, tied=False, seed=1)
        wt, _ = make_model(j("tied"), tok_dir, tied=True, seed=2)
        a = make_adapter(j("adapter"), seed=3)
        merged = merged_weights(w, a)

        def export(out, model, fmt="gguf", dtype="f32", adapter=None):
            cmd = [xtask, "export", "--model", j(model), "--format", fmt, "--dtype", dtype,
                   "--output", j(out)]
            if adapter:
                cmd += ["--adapter", j(adapter)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            print(f"      export {out}: {p.stdout.strip()} {p.stderr.strip()}".rstrip())
            if p.returncode != 0:
                sys.exit(1)
            return j(out)

        # The user's path: an adapter trained by `cargo xtask finetune` (a few steps of the
        # tutorial's recipe on the Huanhuan data, with a large learning rate so it matters).
        data = os.path.join(os.path.dirname(tok_dir), "huanhuan", "huanhuan.json")
        p = subprocess.run([xtask, "finetune", "--model", j("base"), "--data", data, "--output",
                            j("finetuned"), "--max-steps", "4", "--learning-rate", "0.01",
                            "--per-device-train-batch-size", "1"], capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"cargo xtask finetune failed:\n{p.stdout}{p.stderr}")
        print("      finetune: " + p.stdout.strip().splitlines()[-1])
        files = {"base": export("base-f32.gguf", "base"), "tied": export("tied-f32.gguf", "tied"),
                 "lora": export("adapter-f32.gguf", "base", "gguf-lora", "f32", "adapter"),
                 "ft": export("finetuned-f32.gguf", "base", adapter="finetuned"),
                 "ft-lora": export("finetuned-lora-f32.gguf", "base", "gguf-lora", "f32",
                                   "finetuned")}
        for dt in ("f32", "f16", "bf16", "q8_0"):
            files[dt] = export(f"merged-{dt}.gguf", "base", dtype=dt, adapter="adapter")

        print("== gguf reader")
        _, e = check_model_file(files["base"], cfg, w, "f32", tok_dir)
        check(e == 0.0, f"base-f32.gguf: every tensor equals the safetensors exactly (max |diff| {e})")
        _, e = check_model_file(files["tied"], cfg, wt, "f32", tok_dir)
        check(e == 0.0, f"tied-f32.gguf: no output.weight, data exact (max |diff| {e})")
        _, e = check_model_file(files["f32"], cfg, merged, "f32", tok_dir)
        check(e < 1e-5, f"merged-f32.gguf: merged weights equal numpy's W + (alpha/r)·B·A "
                        f"(max |diff| {e:.2e})")
        # The quantized files are compared with gguf's quantizer applied to our f32 merge.
        rf32 = GGUFReader(files["f32"])
        ours_merged = {}
        for t in rf32.tensors:
            k = next(k for k in merged if gguf_name(k) == t.name)
            ours_merged[k] = np.array(t.data).reshape(merged[k].shape)
        for dt in ("f16", "bf16", "q8_0"):
            check_model_file(files[dt], cfg, ours_merged, dt, tok_dir)
            if not FAILS:
                print(f"ok    merged-{dt}.gguf: bytes equal gguf.quants.quantize of the f32 export")
        r = GGUFReader(files["lora"])
        meta_ok = (field(r, "general.type") == "adapter" and field(r, "adapter.type") == "lora"
                   and field(r, "adapter.lora.alpha") == ALPHA
                   and field(r, "general.architecture") == "qwen2")
        lora_ok = len(r.tensors) == 2 * 7 * L
        for t in r.tensors:
            base, fac = t.name.rsplit(".", 1)
            k = next(k for k in w if gguf_name(k) == base)
            src = a[f"base_model.model.{k[:-len('.weight')]}.lora_{fac[-1].upper()}.weight"]
            got = np.array(t.data).reshape(src.shape)
            lora_ok &= list(reversed([int(x) for x in t.shape])) == list(src.shape)
            lora_ok &= np.array_equal(got, src)
        check(meta_ok and lora_ok, f"adapter-f32.gguf: general.type adapter, adapter.lora.alpha "
                                   f"{ALPHA}, {len(r.tensors)} lora_a/lora_b tensors equal PEFT's A, B")

        print("== llama.cpp (llama-cpp-python", llama_cpp.__version__ + ")")
        runs = [("base", files["base"], None, j("base"), None),
                ("merged f32", files["f32"], None, j("base"), j("adapter")),
                ("base + gguf-lora", files["base"], files["lora"], j("base"), j("adapter")),
                ("tied", files["tied"], None, j("tied"), None),
                ("finetuned, merged f32", files["ft"], None, j("base"), j("finetuned")),
                ("base + finetuned gguf-lora", files["base"], files["ft-lora"], j("base"),
                 j("finetuned"))]
        cache = {}
        for what, path, lora, model, adapter in runs:
            key = (model, adapter)
            if key not in cache:
                cache[key] = ours(xtask, model, adapter)
            p_ids, g_ids, logits = cache[key]
            toks, out, first = llama(path, p_ids, lora)
            err = float(np.abs(first - logits).max()) / float(np.abs(logits).max())
            check(toks == p_ids, f"{what}: llama.cpp tokenizes the {len(p_ids)}-token chat prompt "
                                 f"as ours")
            check(out == g_ids, f"{what}: greedy {len(out)} tokens equal ours token for token "
                                f"(first-token logits max rel diff {err:.2e})"
                  + ("" if out == g_ids else f"\n        ours  {g_ids}\n        llama {out}"))
            check(err <= TOLERANCE["f32"], f"{what}: first-token logits within {TOLERANCE['f32']}")
        # Each adapter changes what the base says (else the adapter runs above prove little).
        base_out = cache[(j("base"), None)]
        for name in ("adapter", "finetuned"):
            o = cache[(j("base"), j(name))]
            d = float(np.abs(o[2] - base_out[2]).max())
            label = "random" if name == "adapter" else name
            check(d > 1e-2, f"the {label} adapter moves our first-token logits by {d:.3f} "
                            f"(greedy output {'differs' if o[1] != base_out[1] else 'is the same'})")
        p_ids, g_ids, logits = cache[(j("base"), j("adapter"))]
        for dt in ("f16", "bf16", "q8_0"):
            _, out, first = llama(files[dt], p_ids)
            err = float(np.abs(first - logits).max()) / float(np.abs(logits).max())
            same = next((i for i, (x, y) in enumerate(zip(out, g_ids)) if x != y), len(out))
            check(err <= TOLERANCE[dt],
                  f"merged {dt}: first-token logits max |diff| / max |logit| = {err:.2e} "
                  f"(tolerance {TOLERANCE[dt]}); argmax {'equal' if first.argmax() == logits.argmax() else 'DIFFERS'}; "
                  f"greedy continuation equals ours for {same}/{len(g_ids)} tokens")
    print(f"\n{len(FAILS)} check(s) failed" if FAILS else "\nall checks passed")
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
