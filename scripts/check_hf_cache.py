#!/usr/bin/env python3
"""Checks that our downloads and Python's share one cache, both ways, against the mock hub.

Pinned environment (made by this script when missing, in .venv-hub):
    huggingface_hub==2.4.0  modelscope==1.40.2  (Python 3.11)

Run (from the repository root; builds what it runs):
    python3 scripts/check_hf_cache.py

1. ours → Python: `cargo xtask download Qwen/Tiny-Instruct` (and the adapter) against the mock hub
   (`HF_ENDPOINT`), then `huggingface_hub` with `local_files_only=True` finds every file at the same
   path with the same bytes, and `scan_cache_dir()` reports the repository with no warning;
2. Python → ours: `huggingface_hub.snapshot_download` against the mock hub into a fresh `HF_HOME`,
   then, with the mock hub stopped (any request would fail), `cargo xtask download` and
   `cargo xtask info` use that cache;
3. ModelScope, ours → Python: `cargo xtask download modelscope:qwen/Tiny-Instruct`
   (`MODELSCOPE_ENDPOINT`, `MODELSCOPE_CACHE`), then `modelscope.snapshot_download(...,
   local_files_only=True)` returns our directory;
4. ModelScope, Python → ours: `modelscope.snapshot_download` against the mock hub (its lock files
   must be named as ours, so the two never write one file together), then, with the mock hub
   stopped, `cargo xtask download modelscope:...` uses that directory.
Exits non-zero on the first difference.
"""
import os
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
VENV = os.path.join(ROOT, ".venv-hub")
PINS = ["huggingface_hub==2.4.0", "modelscope==1.40.2"]
XTASK = os.path.join(ROOT, "target", "release", "xtask")
MOCK = os.path.join(ROOT, "target", "release", "mock-hub")
FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"]


def in_venv():
    """Re-runs this script with the pinned venv's Python (made on first use)."""
    py = os.path.join(VENV, "bin", "python")
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        return
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", *PINS], check=True)
    os.execv(py, [py, *sys.argv])


def run(args, env, check=True):
    p = subprocess.run(args, env=env, capture_output=True, text=True)
    if check and p.returncode != 0:
        sys.exit(f"FAIL: {' '.join(args)}\n{p.stdout}\n{p.stderr}")
    return p


def start_mock(repos):
    args = [MOCK]
    for rid, d in repos:
        args += ["--repo", f"{rid}={d}"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    url = p.stdout.readline().split()[1]
    return p, url


def clean_env(**kw):
    env = {k: v for k, v in os.environ.items() if not (k.startswith("HF_") or k.startswith("MODELSCOPE_"))}
    env.update({k: str(v) for k, v in kw.items()})
    return env


def same_bytes(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def main():
    in_venv()
    os.chdir(ROOT)
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "xtask", "-p", "test-support", "--bin", "mock-hub"], check=True)
    tmp = tempfile.mkdtemp()
    demo = os.path.join(tmp, "demo")
    run([XTASK, "finetune", "--output", demo, "--max-steps", "1"], os.environ)
    model, adapter = os.path.join(demo, "model"), os.path.join(demo, "adapter")
    mock, url = start_mock([("Qwen/Tiny-Instruct", model), ("me/tiny-lora", adapter), ("qwen/Tiny-Instruct", model)])
    print(f"mock hub at {url}")
    import huggingface_hub as hh

    print(f"huggingface_hub {hh.__version__}")
    ok = True
    try:
        # 1. ours -> Python
        home = os.path.join(tmp, "hf-ours")
        env = clean_env(HF_ENDPOINT=url, HF_HOME=home)
        ours = run([XTASK, "download", "Qwen/Tiny-Instruct"], env).stdout.strip()
        ours_adapter = run([XTASK, "download", "--adapter", "me/tiny-lora"], env).stdout.strip()
        os.environ.update(HF_HOME=home, HF_ENDPOINT=url)
        os.environ.pop("HF_HUB_CACHE", None)
        from huggingface_hub import constants

        constants.HF_HUB_CACHE = os.path.join(home, "hub")
        snap = hh.snapshot_download("Qwen/Tiny-Instruct", local_files_only=True, cache_dir=constants.HF_HUB_CACHE)
        print(f"1. ours -> Python: snapshot_download(local_files_only=True) = {snap}")
        if os.path.realpath(snap) != os.path.realpath(ours):
            print(f"   FAIL: we wrote {ours}")
            ok = False
        for f in FILES:
            p = hh.hf_hub_download("Qwen/Tiny-Instruct", f, local_files_only=True, cache_dir=constants.HF_HUB_CACHE)
            good = same_bytes(p, os.path.join(model, f)) and os.path.dirname(p) == snap
            print(f"   hf_hub_download({f}, local_files_only=True): {'same file, same bytes' if good else 'DIFFERENT'}")
            ok &= good
        p = hh.hf_hub_download("me/tiny-lora", "adapter_model.safetensors", local_files_only=True, cache_dir=constants.HF_HUB_CACHE)
        good = os.path.dirname(p) == ours_adapter and same_bytes(p, os.path.join(adapter, "adapter_model.safetensors"))
        print(f"   adapter hf_hub_download(local_files_only=True): {'same file, same bytes' if good else 'DIFFERENT'}")
        ok &= good
        info = hh.scan_cache_dir(constants.HF_HUB_CACHE)
        repos = sorted((r.repo_id, r.nb_files, [sorted(x.refs) for x in r.revisions]) for r in info.repos)
        print(f"   scan_cache_dir: repos {repos}, warnings {[str(w) for w in info.warnings]}")
        ok &= not info.warnings and len(repos) == 2

        # 2. Python -> ours
        home2 = os.path.join(tmp, "hf-python")
        cache2 = os.path.join(home2, "hub")
        snap2 = hh.snapshot_download("Qwen/Tiny-Instruct", cache_dir=cache2, endpoint=url)
        print(f"2. Python -> ours: snapshot_download into {snap2}")
        mock.terminate()
        mock.wait()
        env2 = clean_env(HF_ENDPOINT=url, HF_HOME=home2)
        got = run([XTASK, "download", "Qwen/Tiny-Instruct"], env2, check=False)
        good = got.returncode == 0 and os.path.realpath(got.stdout.strip()) == os.path.realpath(snap2)
        print(f"   xtask download with the hub stopped: {'uses the cache' if good else 'FAIL ' + got.stderr.strip()}")
        ok &= good
        got = run([XTASK, "info", "--model", "Qwen/Tiny-Instruct"], env2, check=False)
        good = got.returncode == 0 and "parameters:" in got.stdout
        print(f"   xtask info --model Qwen/Tiny-Instruct (loads the weights): {'ok' if good else 'FAIL ' + got.stderr.strip()}")
        ok &= good
        mock, url = start_mock([("qwen/Tiny-Instruct", model)])

        # 3. ModelScope, ours -> Python
        ms = os.path.join(tmp, "ms")
        env3 = clean_env(MODELSCOPE_ENDPOINT=url, MODELSCOPE_CACHE=ms)
        ours3 = run([XTASK, "download", "modelscope:qwen/Tiny-Instruct"], env3).stdout.strip()
        os.environ.update(MODELSCOPE_CACHE=ms, MODELSCOPE_ENDPOINT=url)
        from modelscope import __version__ as msv
        from modelscope import snapshot_download as ms_snapshot

        snap3 = ms_snapshot("qwen/Tiny-Instruct", local_files_only=True)
        good = os.path.realpath(snap3) == os.path.realpath(ours3) and all(
            same_bytes(os.path.join(snap3, f), os.path.join(model, f)) for f in FILES
        )
        print(f"3. ModelScope ours -> Python (modelscope {msv}): snapshot_download(local_files_only=True) = {snap3}: {'same directory, same bytes' if good else 'DIFFERENT from ' + ours3}")
        ok &= good

        # 4. ModelScope, Python -> ours
        ms4 = os.path.join(tmp, "ms-python")
        os.environ.update(MODELSCOPE_CACHE=ms4)
        snap4 = ms_snapshot("qwen/Tiny-Instruct", cache_dir=ms4)
        same_locks = sorted(os.listdir(os.path.join(ms4, ".lock"))) == sorted(os.listdir(os.path.join(ms, ".lock")))
        print(f"4. ModelScope Python -> ours: snapshot_download into {snap4}; lock files named as ours: {same_locks}")
        ok &= same_locks
        mock.terminate()
        mock.wait()
        got = run([XTASK, "download", "modelscope:qwen/Tiny-Instruct"], clean_env(MODELSCOPE_ENDPOINT=url, MODELSCOPE_CACHE=ms4), check=False)
        good = got.returncode == 0 and os.path.realpath(got.stdout.strip()) == os.path.realpath(snap4)
        print(f"   xtask download modelscope:qwen/Tiny-Instruct with the hub stopped: {'uses the cache' if good else 'FAIL ' + got.stderr.strip()}")
        ok &= good
    finally:
        mock.terminate()
    print("OK" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
