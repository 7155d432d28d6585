#!/usr/bin/env python3
"""Time to first token of each turn of an agent episode, with and without prefix reuse.

Starts `hicra serve` twice on the same model (once as is, once with `--no-prefix-reuse`),
runs the same greedy episode of `--turns` turns against each (every turn adds a long user
message, as a tool result would), streams each reply and measures the time to its first
token. Prints a Markdown table, one row per turn, side by side, and the ratio.

    .deps/venv/bin/python scripts/bench_prefix_reuse.py [--turns 8] [--filler 120]
"""
import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from openai import OpenAI

REPO = Path(__file__).resolve().parents[1]
WORDS = "the tool returned a table of measurements with values for each station and hour".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def episode(url: str, model: str, turns: int, filler: int) -> list[tuple[int, float]]:
    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    messages = [{"role": "system", "content": "You are a careful analyst."}, {"role": "user", "content": "Summarise the data I send, one line each time."}]
    rows = []
    for turn in range(turns):
        messages[-1]["content"] += " " + " ".join(WORDS[(turn + i) % len(WORDS)] for i in range(filler))
        started = time.perf_counter()
        first, text, prompt_tokens = None, "", 0
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0, stream=True,
                                                stream_options={"include_usage": True}, extra_body={"hicra": {"episode_id": "bench"}})
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                prompt_tokens = chunk.usage.prompt_tokens
        rows.append((prompt_tokens, first if first is not None else time.perf_counter() - started))
        messages.append({"role": "assistant", "content": text})
        messages.append({"role": "user", "content": "Next batch:"})
    return rows


def serve(flags: list[str], port: int) -> subprocess.Popen:
    binary = os.environ.get("HICRA_BIN", str(REPO / "target" / "release" / "hicra"))
    proc = subprocess.Popen([binary, "serve", "--device", "cpu", "--port", str(port), "--max-context", "4096", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(240):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.25)
    proc.kill()
    sys.exit("server did not start")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--filler", type=int, default=120, help="words added to the conversation per turn")
    p.add_argument("--model", default="smollm2-135m-instruct")
    args = p.parse_args()
    results = {}
    for name, flags in [("reuse", []), ("whole", ["--no-prefix-reuse"])]:
        port = free_port()
        proc = serve(["--model", args.model, *flags], port)
        try:
            url = f"http://127.0.0.1:{port}"
            episode(url, args.model, 1, 8)  # warm-up, another episode id would not matter
            results[name] = episode(url, args.model, args.turns, args.filler)
        finally:
            proc.terminate()
            proc.wait()
    print(f"time to first token per turn, {args.model}, CPU, greedy, {args.filler} words added per turn")
    print("| turn | prompt tokens | TTFT, prefix reuse | TTFT, whole prefill | reuse speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for turn, ((tokens, reuse), (_, whole)) in enumerate(zip(results["reuse"], results["whole"]), start=1):
        print(f"| {turn} | {tokens} | {reuse * 1000:.0f} ms | {whole * 1000:.0f} ms | x{whole / reuse:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
