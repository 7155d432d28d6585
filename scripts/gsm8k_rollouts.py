#!/usr/bin/env python3
"""Samples rollouts of a served model on GSM8K and writes them as a mining corpus.

For the first --problems problems of .deps/data/gsm8k_test.jsonl (scripts/extract_math_data.py),
asks an OpenAI-compatible server (`hicra serve`) for --samples completions each (one request
with n), scores each with the last number in the completion against the answer, and writes
one JSON line per rollout: {"prompt", "answer", "completion", "reward"}. That file is what
`hicra sg mine` reads (reward 1 = correct).

    .deps/venv/bin/python scripts/gsm8k_rollouts.py --url http://127.0.0.1:8000 --out rollouts.jsonl

Needs only the openai client (pinned in tests/python/requirements.txt).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openai import OpenAI

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTION = " Think step by step, then give the final answer as a number."


def last_number(text: str) -> str | None:
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def correct(completion: str, answer: str) -> bool:
    got = last_number(completion)
    try:
        return got is not None and abs(float(got) - float(answer.replace(",", ""))) < 1e-6
    except ValueError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--data", default=str(ROOT / ".deps" / "data" / "gsm8k_test.jsonl"))
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    problems = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()][: args.problems]
    client = OpenAI(base_url=args.url + "/v1", api_key=args.api_key, timeout=3600)
    model = client.models.list().data[0].id

    def sample(item: dict) -> list[dict]:
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": item["prompt"] + INSTRUCTION}],
            n=args.samples,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            seed=len(item["prompt"]),
        )
        return [
            {"prompt": item["prompt"], "answer": item["answer"], "completion": c.message.content or "", "reward": float(correct(c.message.content or "", item["answer"]))}
            for c in reply.choices
        ]

    started = time.time()
    rows: list[dict] = []
    with ThreadPoolExecutor(args.concurrency) as pool:
        for done, group in enumerate(pool.map(sample, problems), 1):
            rows.extend(group)
            if done % 20 == 0:
                print(f"[rollouts] {done}/{len(problems)} problems, {time.time() - started:.0f} s", file=sys.stderr)
    out = Path(args.out)
    tmp = out.with_suffix(".partial")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)
    accuracy = sum(r["reward"] for r in rows) / max(len(rows), 1)
    print(f"[rollouts] {len(rows)} rollouts, accuracy {accuracy:.3f}, {time.time() - started:.0f} s -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
