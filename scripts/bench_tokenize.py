#!/usr/bin/env python3
"""Times the tutorial's tokenization of the Huanhuan dataset in Python, for the ratio against
`cargo bench -p lora-data --bench tokenize` (tokenize_huanhuan/seed/...).

Pinned environment:
    transformers==5.24.0  tokenizers==0.23.3  datasets==5.2.0  (Python 3.11)

Run (from the repository root; shared data in ../shared/data or $FERROLORA_SHARED_DATA):
    .venv/bin/pip install datasets==5.2.0 && .venv/bin/python scripts/bench_tokenize.py

Measures, each as the median of --repeats runs, excluding tokenizer and JSON loading (as the Rust
bench does):
  - `Dataset.from_list(records).map(process_func, remove_columns=...)`, the tutorial's path, with the
    map cache disabled so every run tokenizes (num_proc=None: one process, as the tutorial runs it);
  - a plain Python loop calling process_func on each record.
Prints one JSON line.
"""
import argparse
import json
import os
import statistics
import time

from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("FERROLORA_SHARED_DATA") or os.path.join(HERE, "..", "..", "shared", "data")

tokenizer = AutoTokenizer.from_pretrained(os.path.join(SHARED, "qwen2.5-tokenizer"))


def process_func(example):
    MAX_LENGTH = 384
    instruction = tokenizer(f"<|im_start|>system\n现在你要扮演皇帝身边的女人--甄嬛<|im_end|>\n<|im_start|>user\n{example['instruction'] + example['input']}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    response = tokenizer(f"{example['output']}", add_special_tokens=False)
    input_ids = instruction["input_ids"] + response["input_ids"] + [tokenizer.pad_token_id]
    attention_mask = instruction["attention_mask"] + response["attention_mask"] + [1]
    labels = [-100] * len(instruction["input_ids"]) + response["input_ids"] + [tokenizer.pad_token_id]
    if len(input_ids) > MAX_LENGTH:
        input_ids = input_ids[:MAX_LENGTH]
        attention_mask = attention_mask[:MAX_LENGTH]
        labels = labels[:MAX_LENGTH]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def median_time(f, repeats):
    """Median wall and CPU (process) seconds; CPU time is the fairer figure on a busy machine."""
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        f()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    records = json.load(open(os.path.join(SHARED, "huanhuan", "huanhuan.json"), encoding="utf-8"))
    out = {"records": len(records), "repeats": args.repeats}
    out["loop"] = median_time(lambda: [process_func(r) for r in records], args.repeats)
    try:
        import datasets

        datasets.disable_caching()
        datasets.disable_progress_bars()
        ds = datasets.Dataset.from_list(records)
        out["datasets_map"] = median_time(
            lambda: ds.map(process_func, remove_columns=ds.column_names, load_from_cache_file=False),
            args.repeats,
        )
        out["datasets"] = datasets.__version__
    except ImportError:
        out["datasets_map"] = None
    print(json.dumps(out))


if __name__ == "__main__":
    main()
