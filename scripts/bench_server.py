#!/usr/bin/env python3
"""Closed-loop load generator for an OpenAI-compatible server (`hicra serve` or any other).

For each concurrency level C, C client threads each send R chat requests one after another
(a new request as soon as the previous answer arrives), so exactly C requests are in flight.
It reports, per level: aggregate completion tokens per second (all completion tokens divided
by the level's wall time), requests per second, and p50/p99 end-to-end latency; with --stream
also p50/p99 time to first token. Results are printed as a table (stderr) and as one JSON
object per level (stdout), so `... > results.jsonl` keeps the machine-readable part.

Example:
    .deps/venv/bin/python scripts/bench_server.py --url http://127.0.0.1:8000 \\
        --api-key KEY --concurrency 1,8,32 --requests-per-client 4 --max-tokens 64

Needs only httpx (pinned in tests/python/requirements.txt).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

PROMPTS = [
    "Write a long story about a dragon who learns to fly.",
    "Explain how a bicycle works, step by step, in detail.",
    "Describe a day in the life of a lighthouse keeper.",
    "List as many fruits as you can and say something about each.",
]


@dataclass
class Sample:
    """One finished request."""

    latency_s: float
    ttft_s: float | None
    completion_tokens: int


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def request_body(args: argparse.Namespace, model: str, client: int, i: int) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[(client + i) % len(PROMPTS)]}],
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed + client * 1000 + i,
    }
    if args.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def one_request(http: httpx.Client, body: dict) -> Sample:
    """Sends one chat request and times it; raises on any HTTP or protocol error."""
    start = time.perf_counter()
    if not body.get("stream"):
        response = http.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        tokens = response.json()["usage"]["completion_tokens"]
        return Sample(time.perf_counter() - start, None, tokens)
    ttft = None
    tokens = None
    content_chunks = 0
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                content_chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if tokens is None:
        # Servers that ignore stream_options (llama-cpp-python's) send no usage chunk; they
        # stream one token per chunk, so the chunks with text count the tokens (a token whose
        # bytes end mid-character may carry no text: a slight undercount).
        tokens = content_chunks
    return Sample(time.perf_counter() - start, ttft, tokens)


def run_level(args: argparse.Namespace, model: str, concurrency: int) -> dict:
    """Runs one concurrency level and summarises it."""
    samples: list[Sample] = []
    errors: list[str] = []
    lock = threading.Lock()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    with httpx.Client(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits) as http:

        def client_loop(client: int) -> None:
            for i in range(args.requests_per_client):
                try:
                    sample = one_request(http, request_body(args, model, client, i))
                except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as err:
                    with lock:
                        errors.append(f"{type(err).__name__}: {err}")
                    continue
                with lock:
                    samples.append(sample)

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(client_loop, range(concurrency)))
        wall_s = time.perf_counter() - start

    latencies = [s.latency_s for s in samples]
    ttfts = [s.ttft_s for s in samples if s.ttft_s is not None]
    tokens = sum(s.completion_tokens for s in samples)
    result = {
        "concurrency": concurrency,
        "requests": len(samples),
        "errors": len(errors),
        "completion_tokens": tokens,
        "wall_s": round(wall_s, 3),
        "tokens_per_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
        "requests_per_s": round(len(samples) / wall_s, 3) if wall_s > 0 else None,
        "latency_p50_s": round(percentile(latencies, 50), 3),
        "latency_p99_s": round(percentile(latencies, 99), 3),
        "mean_tokens_per_request": round(tokens / len(samples), 1) if samples else None,
    }
    if args.stream:
        result["ttft_p50_s"] = round(percentile(ttfts, 50), 3)
        result["ttft_p99_s"] = round(percentile(ttfts, 99), 3)
    if errors:
        result["first_error"] = errors[0]
    return result


def served_model(args: argparse.Namespace) -> str:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    response = httpx.get(f"{args.url}/v1/models", headers=headers, timeout=args.timeout)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def print_table(results: list[dict], stream: bool) -> None:
    columns = ["concurrency", "requests", "errors", "tokens_per_s", "requests_per_s",
               "latency_p50_s", "latency_p99_s", "mean_tokens_per_request"]
    if stream:
        columns += ["ttft_p50_s", "ttft_p99_s"]
    widths = [max(len(c), *(len(str(r.get(c))) for r in results)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)), file=sys.stderr)
    for r in results:
        print("  ".join(str(r.get(c)).rjust(w) for c, w in zip(columns, widths)), file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--api-key", default=None, help="bearer token, if the server needs one")
    parser.add_argument("--model", default=None, help="model id (default: the first served one)")
    parser.add_argument("--concurrency", default="1,8,32",
                        help="comma-separated client counts, one level each")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0, help="base seed; each request adds to it")
    parser.add_argument("--stream", action="store_true", help="stream and measure time to first token")
    parser.add_argument("--no-warmup", action="store_true", help="skip the one warm-up request")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    args = parser.parse_args(argv)
    try:
        args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--concurrency must be integers separated by commas, got {args.concurrency!r}")
    if not args.levels or min(args.levels) < 1:
        parser.error("--concurrency levels must be >= 1")
    if args.requests_per_client < 1 or args.max_tokens < 1:
        parser.error("--requests-per-client and --max-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = args.model or served_model(args)
    if not args.no_warmup:
        with httpx.Client(base_url=args.url, timeout=args.timeout, headers=(
            {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        )) as http:
            one_request(http, request_body(args, model, 0, 0))
    results = []
    for level in args.levels:
        result = run_level(args, model, level)
        result["model"] = model
        result["max_tokens"] = args.max_tokens
        print(json.dumps(result), flush=True)
        results.append(result)
    print_table(results, args.stream)
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
