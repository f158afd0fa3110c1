#!/usr/bin/env python3
"""PEFT's PiSSA and OLoRA initializations of seeded weights, and PEFT's conversion of a trained
PiSSA/OLoRA adapter into a plain LoRA: the reference `crates/lora-core/src/init.rs` is tested against
(`crates/lora-core/tests/inits.rs`).

Pinned environment (the versions these fixtures were generated with):
    torch==2.15.0  transformers==5.24.0  peft==0.21.2  safetensors==0.8.0  (Python 3.11)

Regenerate (from the repository root):
    .venv/bin/pip install torch==2.15.0 transformers==5.24.0 peft==0.21.2 safetensors==0.8.0 \
        && .venv/bin/python scripts/make_init_fixtures.py

Everything runs on the CPU in float32 (torch's SVD and QR are LAPACK's, from MKL here). Each weight
`w.<name>` [out, in] is wrapped in a one-layer module (an `nn.Linear` named `lin`, no bias) and
`get_peft_model(module, LoraConfig(target_modules=["lin"], init_lora_weights=INIT, ...))` runs
PEFT's own `pissa_init` / `olora_init`; `tests/fixtures/lora-inits/inits.safetensors` holds, per
case `<weight>.<init>.r<r>a<alpha>[.rslora]`, the adapter PEFT made and the base weight it left:
    <case>.lora_A [r, in]   <case>.lora_B [out, r]   <case>.residual [out, in]
The weights: `w.uniform` [64, 48] is nn.Linear's default (Kaiming-uniform) init, a flat spectrum;
`w.decay_wide` [32, 64] and `w.decay_tall` [96, 48] are U·diag(s)·Vᵀ with Haar-random U, V and
s_i = 0.9^i + 0.05 (well-separated leading singular values, like a trained weight's). pissa_niter_4
draws torch's random test matrix after `torch.manual_seed(0)`.

Conversion (`save_pretrained(dir, path_initial_model_for_weight_conversion=init_dir)`), per case
`conv.<name>`: the adapter right after init was saved to init_dir, then A and B were perturbed by
seeded noise (a stand-in for training), then saved with the conversion:
    conv.<name>.A, .B (the perturbed adapter), .A0, .B0 (the init), .A_plain, .B_plain (the file)
and `inits.json` records, per conversion case, the config before and the adapter_config.json
written (r, lora_alpha, use_rslora, rank_pattern, alpha_pattern, init_lora_weights), plus what
`PeftModel.from_pretrained` does to the base weight when the saved adapter_config.json says
init_lora_weights="pissa" / "olora" / "pissa_niter_4" (it runs the init again on the weight it is
given: see `load` in the JSON).
"""
import json
import os
import shutil
import tempfile

import torch
from torch import nn
from safetensors.torch import load_file, save_file
from peft import LoraConfig, PeftModel, get_peft_model

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join("tests", "fixtures", "lora-inits")


class Tiny(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(w)

    def forward(self, x):
        return self.lin(x)


def decaying(out, inp, seed):
    g = torch.Generator().manual_seed(seed)
    k = min(out, inp)
    u, _ = torch.linalg.qr(torch.randn(out, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, k, generator=g, dtype=torch.float64))
    s = 0.9 ** torch.arange(k, dtype=torch.float64) + 0.05
    return (u @ torch.diag(s) @ v.T).float()


def weights():
    torch.manual_seed(1)
    uniform = nn.Linear(48, 64, bias=False).weight.detach().clone()
    return {"uniform": uniform, "decay_wide": decaying(32, 64, 2), "decay_tall": decaying(96, 48, 3)}


def peft_model(w, init, r, alpha, rslora=False, **kw):
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["lin"],
                     init_lora_weights=init, use_rslora=rslora, **kw)
    torch.manual_seed(0)  # pissa_niter_N's random test matrix
    return get_peft_model(Tiny(w.clone()), cfg)


def parts(model):
    lin = model.base_model.model.lin
    return (lin.lora_A["default"].weight.detach().clone(), lin.lora_B["default"].weight.detach().clone(),
            lin.base_layer.weight.detach().clone())


def config_fields(d):
    keys = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "init_lora_weights")
    return {k: d[k] for k in keys}


def conversion(name, w, init, r, alpha, rslora, extra, tensors, tmp):
    model = peft_model(w, init, r, alpha, rslora, **extra)
    a0, b0, _ = parts(model)
    init_dir = os.path.join(tmp, f"{name}-init")
    model.save_pretrained(init_dir)
    g = torch.Generator().manual_seed(7)
    lin = model.base_model.model.lin
    with torch.no_grad():
        lin.lora_A["default"].weight.add_(0.05 * torch.randn(a0.shape, generator=g))
        lin.lora_B["default"].weight.add_(0.05 * torch.randn(b0.shape, generator=g))
    a, b, _ = parts(model)
    before = config_fields(model.peft_config["default"].to_dict())
    ft_dir = os.path.join(tmp, f"{name}-ft")
    model.save_pretrained(ft_dir, path_initial_model_for_weight_conversion=init_dir)
    saved = load_file(os.path.join(ft_dir, "adapter_model.safetensors"))
    with open(os.path.join(ft_dir, "adapter_config.json")) as f:
        after = config_fields(json.load(f))
    p = f"conv.{name}"
    tensors.update({f"{p}.A": a, f"{p}.B": b, f"{p}.A0": a0, f"{p}.B0": b0,
                    f"{p}.A_plain": saved["base_model.model.lin.lora_A.weight"],
                    f"{p}.B_plain": saved["base_model.model.lin.lora_B.weight"]})
    return {"init": init, "weight": name.split("-")[0], "before": before, "saved": after}


def load_behaviour(w, init, tmp):
    """Saves a freshly initialized adapter as a user would (init_lora_weights=INIT in its config) and
    loads it with PeftModel.from_pretrained onto the ORIGINAL weight: what happens to the base?"""
    model = peft_model(w, init, 8, 32)
    a0, b0, residual = parts(model)
    d = os.path.join(tmp, f"load-{init}")
    model.save_pretrained(d)
    with open(os.path.join(d, "adapter_config.json")) as f:
        saved_init = json.load(f)["init_lora_weights"]
    out = {"saved_init_lora_weights": saved_init}
    for low_cpu in (False, True):
        torch.manual_seed(123)  # a different RNG state than at training time
        try:
            loaded = PeftModel.from_pretrained(Tiny(w.clone()), d, low_cpu_mem_usage=low_cpu)
        except Exception as e:  # the init writes real tensors into meta-device parameters
            out[f"low_cpu_mem_usage={low_cpu}"] = {"error": f"{type(e).__name__}: {e}"}
            continue
        a, b, base = parts(loaded)
        out[f"low_cpu_mem_usage={low_cpu}"] = {
            "base_max_abs_change_from_W": (base - w).abs().max().item(),
            "base_max_abs_diff_from_init_residual": (base - residual).abs().max().item(),
            "adapter_equals_file": bool(torch.equal(a, a0) and torch.equal(b, b0)),
        }
    return out


def main():
    os.chdir(ROOT)
    torch.set_num_threads(1)
    ws = weights()
    tensors = {f"w.{k}": v for k, v in ws.items()}
    cases = []
    for wname, w in ws.items():
        for init in ("pissa", "pissa_niter_4", "olora"):
            cases.append((wname, init, 8, 32, False))
    for init in ("pissa", "olora"):
        cases.append(("decay_wide", init, 4, 8, True))
    cases.append(("uniform", "pissa", 4, 8, False))
    listed = []
    for wname, init, r, alpha, rslora in cases:
        a, b, res = parts(peft_model(ws[wname], init, r, alpha, rslora))
        key = f"{wname}.{init}.r{r}a{alpha}" + (".rslora" if rslora else "")
        tensors.update({f"{key}.lora_A": a, f"{key}.lora_B": b, f"{key}.residual": res})
        listed.append({"key": key, "weight": wname, "init": init, "r": r, "lora_alpha": alpha,
                       "use_rslora": rslora})
    info = {"cases": listed, "conversions": {}, "load": {}}
    with tempfile.TemporaryDirectory() as tmp:
        info["conversions"]["uniform-pissa"] = conversion(
            "uniform-pissa", ws["uniform"], "pissa", 8, 32, False, {}, tensors, tmp)
        info["conversions"]["decay_wide-olora-rslora"] = conversion(
            "decay_wide-olora-rslora", ws["decay_wide"], "olora", 4, 8, True, {}, tensors, tmp)
        info["conversions"]["decay_tall-pissa-patterns"] = conversion(
            "decay_tall-pissa-patterns", ws["decay_tall"], "pissa", 8, 32, False,
            {"rank_pattern": {"lin": 4}, "alpha_pattern": {"lin": 16}}, tensors, tmp)
        for init in ("pissa", "olora", "pissa_niter_4"):
            info["load"][init] = load_behaviour(ws["decay_tall"], init, tmp)
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "inits.safetensors"))
    with open(os.path.join(OUT, "inits.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    print(json.dumps(info["conversions"], indent=1), json.dumps(info["load"], indent=1))
    print(f"{os.path.getsize(os.path.join(OUT, 'inits.safetensors'))} bytes")


if __name__ == "__main__":
    main()
