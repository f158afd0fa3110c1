#!/usr/bin/env python3
"""PyTorch + PEFT side of the GPU comparison (issue 9): LoRA training steps of a random-weight Qwen2
with the tutorial's LoraConfig, bf16 base on the GPU, SDPA attention, the same shapes and fields as
`xtask bench-train`. Also `--matmul-probe`: the card's measured bf16 GEMM rate (for MFU).

Pinned: torch 2.x with CUDA, transformers 5.x, peft 0.2x (the GPU image's). Prints one JSON line.
    python3 scripts/peft_gpu_bench.py --size 7b --batch 4 --seq 384 [--checkpointing]
    python3 scripts/peft_gpu_bench.py --matmul-probe
"""
import argparse, json, resource, time

import torch

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False),
    "mini": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=4, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


def sync(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_probe(dev, n=8192, reps=20):
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    dt = (time.perf_counter() - t0) / reps
    return 2 * n ** 3 / dt / 1e12


def main():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from peft import LoraConfig, TaskType, get_peft_model

    p = argparse.ArgumentParser()
    p.add_argument("--size", default="7b", choices=SIZES)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=384)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--matmul-probe", action="store_true")
    a = p.parse_args()
    if a.matmul_probe:
        print(json.dumps({"impl": "torch", "device": a.device, "bf16_matmul_tflops": round(matmul_probe(a.device), 2)}))
        return
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    cfg = Qwen2Config(rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
                      attn_implementation="sdpa", **SIZES[a.size])
    with torch.device(a.device):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    if a.checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lcfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=32, lora_dropout=0.1,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lcfg)
    for n, q in model.named_parameters():  # adapters in f32, as the Rust side keeps them
        if q.requires_grad:
            q.data = q.data.float()
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=g).to(a.device)
    labels = ids.clone()
    labels[:, : a.seq // 3] = -100
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(1 + a.steps):
        sync(a.device)
        t0 = time.perf_counter()
        with torch.autocast(device_type="cuda" if a.device.startswith("cuda") else "cpu", dtype=dtype,
                            enabled=a.device.startswith("cuda")):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        sync(a.device)
        if step > 0:
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if a.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(dict(impl="transformers+peft", size=a.size, batch=a.batch, seq=a.seq, device=a.device,
                          dtype=str(dtype).replace("torch.", ""), checkpointing=a.checkpointing,
                          step_s_median=round(med, 4), tokens_per_s=round(a.batch * a.seq / med, 1),
                          peak_mem_mib=round(peak, 1), loss=round(out.loss.item(), 4))))


if __name__ == "__main__":
    main()
