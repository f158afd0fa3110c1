#!/usr/bin/env python3
"""An adapter fine-tuned here on a 4-bit base loads in PEFT on transformers' bitsandbytes 4-bit load
of the same base and gives our logits.

Pinned environment:
    torch==2.15.0  transformers==5.24.0  peft==0.21.2  bitsandbytes==0.50.2  (Python 3.11)

Run (from the repository root, with `.venv` holding those):
    .venv/bin/python scripts/check_qlora_peft.py

It builds xtask, runs the demo (`cargo xtask finetune --max-steps 1`) in a temporary directory for
its model, fine-tunes an adapter on it with `--load-in-4bit --bnb-4bit-use-double-quant` (NF4,
float32 compute; 30 steps), then asks `cargo xtask chat --load-in-4bit --bnb-4bit-use-double-quant
--debug-json` for the logits of the first answer token, and compares them with PEFT's on
`from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4, double quant,
float32))` for the same prompt ids (the embeddings taking a gradient, so that `Linear4bit` runs
`dequantize_4bit` + `linear` as in training). Exits non-zero when the largest difference exceeds
1e-4.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main():
    os.chdir(ROOT)
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "xtask"], check=True)
    xtask = os.path.join(ROOT, "target", "release", "xtask")
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([xtask, "finetune", "--output", os.path.join(d, "demo"), "--max-steps", "1"],
                       check=True, capture_output=True)
        model, data, adapter = (os.path.join(d, "demo", "model"), os.path.join(d, "demo", "data.json"),
                                os.path.join(d, "qlora"))
        q4 = ["--load-in-4bit", "--bnb-4bit-use-double-quant"]
        subprocess.run([xtask, "finetune", "--model", model, "--data", data, "--output", adapter,
                        "--max-steps", "30", "--learning-rate", "2e-3", "--template", "qwen",
                        "--max-length", "160", "--lint", "warn", "--save-steps", "100"] + q4,
                       check=True, capture_output=True)
        out = subprocess.run([xtask, "chat", "--model", model, "--adapter", adapter, "--template",
                              "qwen", "--prompt", "Who are you?", "--greedy", "--max-new-tokens", "4",
                              "--debug-json"] + q4, check=True, capture_output=True, text=True)
        dbg = json.loads([l for l in out.stderr.splitlines() if l.startswith("{")][-1])
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(model, quantization_config=cfg, device_map="cpu",
                                                    dtype=torch.float32, attn_implementation="eager")
        peft = PeftModel.from_pretrained(base, adapter)
        ids = torch.tensor([dbg["prompt_ids"]])
        embeds = peft.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = peft(inputs_embeds=embeds).logits[0, -1].detach()
        ours = torch.tensor(dbg["first_logits"])
        err = (logits - ours).abs().max().item()
        # And the adapter matters: without it the logits move.
        with peft.disable_adapter():
            plain = peft(inputs_embeds=embeds).logits[0, -1].detach()
        moved = (plain - ours).abs().max().item()
    print(f"prompt of {ids.shape[1]} tokens; max |ours - PEFT on bitsandbytes 4-bit| = {err:.2e} "
          f"(the adapter moves the logits by {moved:.2e})")
    ok = err <= 1e-4 and moved > 1e-3
    print("ok" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
