#!/usr/bin/env python3
"""Writes the reference token ids for the `lora-data` crate under tests/fixtures/data/.

Pinned environment (the versions these fixtures were generated with):
    transformers==5.24.0  tokenizers==0.23.3  (Python 3.11)

Regenerate (from the repository root; the shared data lives in ../shared/data or $FERROLORA_SHARED_DATA):
    python3 -m venv .venv && .venv/bin/pip install transformers==5.24.0 tokenizers==0.23.3 \
        && .venv/bin/python scripts/make_data_fixtures.py

Writes:
  huanhuan_seed_reference.json  the tutorial's `process_func` (copied below, unchanged apart from the
      system prompt and MAX_LENGTH being module constants) over all Huanhuan records, in compact form:
      sha256 over the canonical JSON lines of every record, a 12-hex-digit sha256 prefix per record
      (so a failing test names the first differing record), totals, and a few records in full; and the
      totals and sha256 at MAX_LENGTH 64, where truncation happens (records whose labels are then all
      -100 are left out of the hash and listed in `skipped`, as lora-data skips them).
      Canonical line: json.dumps({"input_ids", "labels", "attention_mask"}, separators=(",", ":")) + "\n".
  chat_reference.json  for each sample file in this directory: `apply_chat_template` of the real
      tokenizer (Qwen2.5's own template) with labels = ids on every assistant turn's content plus its
      <|im_end|> (not the "\n" after it), -100 elsewhere; and the `seed` rendering of the same
      conversations (prior turns in the prompt, the last assistant turn as the response).

The `qwen` labels follow transformers' `return_assistant_tokens_mask`: the assistant character span
[start, end) is found on the rendered text, and tokens char_to_token(start)..=char_to_token(end - 1)
are supervised.
"""
import hashlib
import json
import os
import sys

from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "data")
SHARED = os.environ.get("FERROLORA_SHARED_DATA") or os.path.join(HERE, "..", "..", "shared", "data")

SEED_SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"
MAX_LENGTH = 384
SPOT = [0, 1, 2, 100, 1000, 3728]

tokenizer = AutoTokenizer.from_pretrained(os.path.join(SHARED, "qwen2.5-tokenizer"))


# --- The tutorial's process_func, verbatim except for the two constants above. ---
def process_func(example, MAX_LENGTH=MAX_LENGTH):
    instruction = tokenizer(f"<|im_start|>system\n{SEED_SYSTEM}<|im_end|>\n<|im_start|>user\n{example['instruction'] + example['input']}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    response = tokenizer(f"{example['output']}", add_special_tokens=False)
    input_ids = instruction["input_ids"] + response["input_ids"] + [tokenizer.pad_token_id]
    attention_mask = instruction["attention_mask"] + response["attention_mask"] + [1]
    labels = [-100] * len(instruction["input_ids"]) + response["input_ids"] + [tokenizer.pad_token_id]
    if len(input_ids) > MAX_LENGTH:
        input_ids = input_ids[:MAX_LENGTH]
        attention_mask = attention_mask[:MAX_LENGTH]
        labels = labels[:MAX_LENGTH]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def canonical(ex):
    d = {"input_ids": ex["input_ids"], "labels": ex["labels"], "attention_mask": ex["attention_mask"]}
    return json.dumps(d, separators=(",", ":")) + "\n"


def huanhuan(MAX_LENGTH=MAX_LENGTH, spot_ids=SPOT):
    records = json.load(open(os.path.join(SHARED, "huanhuan", "huanhuan.json"), encoding="utf-8"))
    total = hashlib.sha256()
    per_record, spot = [], {}
    truncated = tokens = supervised = 0
    skipped = []
    for i, r in enumerate(records):
        ex = process_func(r, MAX_LENGTH)
        full = len(tokenizer(f"<|im_start|>system\n{SEED_SYSTEM}<|im_end|>\n<|im_start|>user\n{r['instruction'] + r['input']}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]) + len(tokenizer(r["output"], add_special_tokens=False)["input_ids"]) + 1
        truncated += full > MAX_LENGTH
        if all(l == -100 for l in ex["labels"]):
            # process_func would hand this to the loss; lora-data skips and counts it instead.
            skipped.append(i)
            continue
        line = canonical(ex).encode()
        total.update(line)
        per_record.append(hashlib.sha256(line).hexdigest()[:12])
        tokens += len(ex["input_ids"])
        supervised += sum(1 for l in ex["labels"] if l != -100)
        if i in spot_ids:
            spot[str(i)] = ex
    return {
        "records": len(records),
        "system": SEED_SYSTEM,
        "max_length": MAX_LENGTH,
        "pad_token_id": tokenizer.pad_token_id,
        "truncated": truncated,
        "tokens": tokens,
        "supervised_tokens": supervised,
        "sha256": total.hexdigest(),
        "record_sha256_12": per_record,
        "spot": spot,
        "skipped": skipped,
    }


# --- Multi-turn samples: our reading of each format into messages, then the real template. ---
def load(path):
    text = open(path, encoding="utf-8").read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(l) for l in text.splitlines() if l.strip()]


def to_messages(rec):
    if "conversations" in rec:
        role = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
        return [{"role": role[m["from"]], "content": m["value"]} for m in rec["conversations"]]
    if "messages" in rec:
        return [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
    msgs = []
    if rec.get("system"):  # an empty system counts as absent
        msgs.append({"role": "system", "content": rec["system"]})
    for u, a in rec.get("history", []):
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    msgs += [{"role": "user", "content": rec["instruction"] + rec.get("input", "")},
             {"role": "assistant", "content": rec["output"]}]
    return msgs


def qwen_example(msgs):
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False)
    ids = enc["input_ids"]
    # The same ids as apply_chat_template(tokenize=True) (checked here, not assumed).
    direct = tokenizer.apply_chat_template(msgs, tokenize=True)
    direct = direct["input_ids"] if isinstance(direct, dict) or hasattr(direct, "keys") else direct
    assert list(direct) == ids, "apply_chat_template(tokenize=True) differs from tokenizing its text"
    labels = [-100] * len(ids)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(msgs[:i], tokenize=False) if i else ""
        upto = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
        assert text.startswith(upto) and upto.startswith(before), "template is not prefix-stable"
        start = len(before) + len("<|im_start|>assistant\n")
        end = len(upto) - 1  # content + <|im_end|>, not the trailing "\n"
        assert upto[start:end] == m["content"] + "<|im_end|>"
        t0, t1 = enc.char_to_token(start), enc.char_to_token(end - 1)
        for t in range(t0, t1 + 1):
            labels[t] = ids[t]
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


def seed_example(msgs, default_system):
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else default_system
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    assert body[-1]["role"] == "assistant"
    prompt = f"<|im_start|>system\n{system}<|im_end|>\n"
    for m in body[:-1]:
        prompt += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    prompt += "<|im_start|>assistant\n"
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(body[-1]["content"], add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id
    return {"input_ids": p + r + [pad], "labels": [-100] * len(p) + r + [pad], "attention_mask": [1] * (len(p) + len(r) + 1)}


def chats():
    out = {}
    for name in ["chat_sharegpt.json", "chat_messages.jsonl", "alpaca_history.jsonl"]:
        recs = load(os.path.join(OUT, name))
        msgs = [to_messages(r) for r in recs]
        out[name] = {
            "qwen": [qwen_example(m) for m in msgs],
            "seed": [seed_example(m, SEED_SYSTEM) for m in msgs],
        }
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    h = huanhuan()
    short = huanhuan(64, [])
    h["max_length_64"] = {k: short[k] for k in ["truncated", "skipped", "tokens", "supervised_tokens", "sha256"]}
    with open(os.path.join(OUT, "huanhuan_seed_reference.json"), "w", encoding="utf-8") as f:
        json.dump(h, f, ensure_ascii=False, separators=(",", ":"))
    with open(os.path.join(OUT, "chat_reference.json"), "w", encoding="utf-8") as f:
        json.dump(chats(), f, ensure_ascii=False, separators=(",", ":"))
    print(f"huanhuan (max_length 64): {h['max_length_64']}", file=sys.stderr)
    print(f"huanhuan: {h['records']} records, {h['truncated']} truncated, {h['tokens']} tokens, sha256 {h['sha256']}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
