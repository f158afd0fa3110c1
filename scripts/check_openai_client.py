#!/usr/bin/env python3
"""Checks `cargo xtask serve` with the official OpenAI Python client, as an application would use it.

Pinned environment (made by this script when missing, in .venv-openai):
    openai==3.57.0  (Python 3.11)
By hand: python3 -m venv .venv-openai && .venv-openai/bin/pip install openai==3.57.0

Run (from the repository root; builds xtask, runs the demo fine-tune (`cargo xtask finetune`, ~10 s)
in a temporary directory, serves the demo model and its adapter from there on a free port, and
stops the server at the end):
    python3 scripts/check_openai_client.py
Or against a server already running (every model it lists is checked):
    python3 scripts/check_openai_client.py --base-url http://127.0.0.1:8000 [--api-key KEY]

1. `client.models.list()` lists at least one model, each with an id and `owned_by`;
2. for each model, a non-streaming chat at temperature 0: one choice, an assistant message,
   `finish_reason` `stop` or `length` (`length` only at `max_tokens`), usage counts that add up;
3. the same request streamed (`stream_options.include_usage`): the first delta has the role, the
   joined deltas equal the non-streaming answer, the same `finish_reason` and usage;
4. an unknown model raises `openai.NotFoundError` whose message names the model;
5. `max_tokens=0` raises `openai.BadRequestError`.
Prints one line per check and exits non-zero when any fails.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import threading

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
VENV = os.path.join(ROOT, ".venv-openai")
PINS = ["openai==3.57.0"]
XTASK = os.path.join(ROOT, "target", "release", "xtask")
MAX_TOKENS = 64
# One of the demo's held-out requests: the demo adapter answers it and stops; the base does not.
MESSAGES = [{"role": "user", "content": "Who are you, my lady?"}]


def in_venv():
    """Re-runs this script with the pinned venv's Python (made on first use)."""
    py = os.path.join(VENV, "bin", "python")
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        return
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", *PINS], check=True)
    os.execv(py, [py, *sys.argv])


def start_server(cwd):
    """Builds xtask, runs the demo fine-tune in `cwd` (so that `serve` has its adapter too) and
    starts `xtask serve --port 0` there; returns the process and its base URL."""
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "xtask"], cwd=ROOT, check=True)
    ft = subprocess.run([XTASK, "finetune"], cwd=cwd, capture_output=True, text=True)
    if ft.returncode != 0:
        sys.exit(f"FAIL: xtask finetune ({ft.returncode}):\n{ft.stdout}\n{ft.stderr}")
    p = subprocess.Popen([XTASK, "serve", "--port", "0"], cwd=cwd, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in p.stderr:
        seen.append(line)
        if line.startswith("serving on "):
            url = line.split()[-1]
            # Keep reading, so that a full pipe never blocks the server.
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            return p, url
    sys.exit(f"FAIL: xtask serve exited ({p.wait()}) before `serving on`:\n{''.join(seen)}")


class Checks:
    def __init__(self):
        self.failed = 0

    def check(self, name, ok, detail=""):
        print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
        self.failed += not ok
        return ok


def check_model(c, client, model):
    req = dict(model=model, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS)
    r = client.chat.completions.create(**req)
    choice, u = r.choices[0], r.usage
    answer = choice.message.content
    c.check(f"[{model}] chat: one assistant choice, object chat.completion",
            len(r.choices) == 1 and choice.message.role == "assistant" and r.object == "chat.completion"
            and isinstance(answer, str), f"{answer!r}")
    c.check(f"[{model}] chat: finish_reason", choice.finish_reason == "stop"
            or (choice.finish_reason == "length" and u.completion_tokens == MAX_TOKENS),
            f"{choice.finish_reason} after {u.completion_tokens} tokens (max_tokens {MAX_TOKENS})")
    c.check(f"[{model}] chat: usage", u.prompt_tokens > 0 and 0 < u.completion_tokens <= MAX_TOKENS
            and u.total_tokens == u.prompt_tokens + u.completion_tokens,
            f"prompt {u.prompt_tokens} + completion {u.completion_tokens} = total {u.total_tokens}")

    deltas, finish, usage, first = [], None, None, None
    for chunk in client.chat.completions.create(**req, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if first is None:
                first = ch.delta
            if ch.delta.content:
                deltas.append(ch.delta.content)
            finish = ch.finish_reason or finish
    streamed = "".join(deltas)
    c.check(f"[{model}] stream: the first delta has role assistant", first is not None and first.role == "assistant")
    c.check(f"[{model}] stream: the joined deltas equal the answer", streamed == answer,
            f"{len(deltas)} deltas" if streamed == answer else f"{streamed!r} != {answer!r}")
    c.check(f"[{model}] stream: finish_reason and usage as without streaming",
            finish == choice.finish_reason and usage is not None
            and (usage.prompt_tokens, usage.completion_tokens) == (u.prompt_tokens, u.completion_tokens),
            f"{finish}; usage {usage and (usage.prompt_tokens, usage.completion_tokens)}")


def main():
    in_venv()
    import openai

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", help="a running server (http://HOST:PORT); default: start the demo")
    ap.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
    args = ap.parse_args()

    server, tmp = None, None
    if args.base_url:
        url = args.base_url.rstrip("/")
    else:
        tmp = tempfile.TemporaryDirectory()
        server, url = start_server(tmp.name)
    print(f"openai {openai.__version__} against {url}")
    c = Checks()
    try:
        # No retries: a 429 or 503 must show, not be hidden behind the client's backoff.
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=args.api_key, max_retries=0, timeout=120)
        models = client.models.list().data
        c.check("models.list()", len(models) > 0 and all(m.id and m.owned_by for m in models),
                ", ".join(f"{m.id} (parent {getattr(m, 'parent', None)})" for m in models))
        for m in models:
            check_model(c, client, m.id)
        model = models[0].id if models else "demo"

        try:
            client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=4)
            c.check("unknown model: NotFoundError", False, "the request succeeded")
        except openai.NotFoundError as e:
            c.check("unknown model: NotFoundError", "no-such-model" in e.message, e.message)
        try:
            client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=0)
            c.check("max_tokens=0: BadRequestError", False, "the request succeeded")
        except openai.BadRequestError as e:
            c.check("max_tokens=0: BadRequestError", True, e.message)
    except openai.OpenAIError as e:
        c.check("no unexpected error", False, f"{type(e).__name__}: {e}")
    finally:
        if server:
            server.terminate()
            server.wait()
            tmp.cleanup()
    print("all checks passed" if c.failed == 0 else f"{c.failed} check(s) failed")
    sys.exit(1 if c.failed else 0)


if __name__ == "__main__":
    main()
