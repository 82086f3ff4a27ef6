#!/usr/bin/env python3
"""Token ids and greedy continuations from llama.cpp's llama-server, the reference the engine's
tokenizers and forward pass are tested against (profiler/tests/reference.rs).

Run through scripts/llama-reference.sh, which builds llama.cpp from the llama-cpp-python sdist
and fetches the models. For each prompt: the ids of /tokenize (BOS as the file says, special
tokens parsed), and the first 32 tokens of a greedy /completion on those ids. The chat
template llama.cpp renders with --jinja (/apply-template) is recorded where the file has one.

    scripts/llama-reference.py LLAMA_SERVER MODEL.gguf NAME OUT.json
"""

import hashlib
import json
import socket
import subprocess
import sys
import time
import urllib.request

PROMPTS = {
    "smollm2": [
        "The capital of France is",
        "In 2024, 365 days and 3.14159 - naïve café, 東京, emoji 🦀!",
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "def fibonacci(n):\n    if n < 2:\n        return n\n",
        "  Leading spaces,\ttabs\tand\n\nnewlines  ",
    ],
    "gemma3-270m": [
        "The capital of France is",
        "In 2024, 365 days and 3.14159 - naïve café, 東京, emoji 🦀!",
        "<start_of_turn>user\nWrite a haiku about the sea.<end_of_turn>\n<start_of_turn>model\n",
        "def fibonacci(n):\n    if n < 2:\n        return n\n",
        "  Leading spaces,\ttabs\tand\n\nnewlines  ",
    ],
}
# The tiny random-weight models (profiler/tests/reference.rs) carry SmolLM2's vocabulary.
for tiny in ("tiny-qwen2", "tiny-qwen3", "tiny-llama3"):
    PROMPTS[tiny] = PROMPTS["smollm2"]
CHAT = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "What is 2 + 2?"},
]
GENERATED = 32


def post(port, path, body):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(server, model, extra):
    """Starts llama-server; returns (process, port, command)."""
    port = free_port()
    cmd = [server, "-m", model, "--port", str(port), "-t", "2", "-c", "2048", "-np", "1",
           "--jinja", "--no-warmup"] + extra
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, port, cmd
        except OSError:
            pass
        time.sleep(0.5)
    proc.terminate()
    sys.exit("llama-server did not start")


def greedy(port, ids):
    done = post(port, "/completion", {
        "prompt": ids, "n_predict": GENERATED, "temperature": 0.0, "top_k": 1,
        "cache_prompt": False, "return_tokens": True, "seed": 0,
    })
    return done["tokens"]


def main():
    server, model, name, out = sys.argv[1:5]
    # llama.cpp's default (flash attention chosen automatically: on for the CPU), then the
    # same without flash attention: where the two part, floats decide a near-tie.
    proc, port, cmd = serve(server, model, [])
    try:
        cases = []
        for prompt in PROMPTS[name]:
            ids = post(port, "/tokenize", {"content": prompt, "add_special": True,
                                           "parse_special": True})["tokens"]
            cases.append({"prompt": prompt, "ids": ids, "greedy": greedy(port, ids)})
        try:
            chat = post(port, "/apply-template", {"messages": CHAT})["prompt"]
        except OSError:
            chat = None
    finally:
        proc.terminate()
        proc.wait()
    proc, port, _ = serve(server, model, ["-fa", "off"])
    try:
        for c in cases:
            c["greedy_fa_off"] = greedy(port, c["ids"])
    finally:
        proc.terminate()
        proc.wait()
    with open(model, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    with open(out, "w") as f:
        json.dump({
            "model": name,
            "sha256": digest,
            "made_by": "scripts/llama-reference.sh (llama-server of llama-cpp-python 0.3.36's "
                       "vendored llama.cpp: " + " ".join(["-m", "MODEL"] + cmd[5:])
                       + "; greedy_fa_off: the same with -fa off)",
            "generated": GENERATED,
            "cases": cases,
            "chat": {"messages": CHAT, "prompt": chat},
        }, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
