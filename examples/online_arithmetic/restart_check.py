#!/usr/bin/env python3
"""Shows that a restarted `hicra serve --train` continues where it stopped.

    restart_check.py --url URL --save before.json     # before stopping the server
    restart_check.py --url URL --compare before.json  # after restarting it on the same --state-dir

It records the policy version the server reports and its greedy answers (and their logprobs)
to the held-out questions of client.py; `--compare` prints both side by side and exits 1 if
the version, an answer, or a logprob (beyond 1e-6) differs.
"""
import argparse
import json
import random
import sys

import httpx
from openai import OpenAI

from client import SYSTEM, question


def snapshot(url: str, api_key: str, count: int) -> dict:
    client = OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=600)
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=600)
    model = client.models.list().data[0].id
    answers = []
    for i in range(count):
        prompt, _ = question(random.Random(10_000 + i))
        r = client.chat.completions.create(model=model, temperature=0, max_tokens=16, logprobs=True,
                                           messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}])
        choice = r.choices[0]
        answers.append({"question": prompt, "answer": choice.message.content,
                        "logprobs": [t.logprob for t in choice.logprobs.content]})
    status = http.get("/v1/training").raise_for_status().json()
    return {"policy_version": status["policy_version"], "answers": answers}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default="none")
    p.add_argument("--questions", type=int, default=6)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save")
    mode.add_argument("--compare")
    args = p.parse_args()
    now = snapshot(args.url, args.api_key, args.questions)
    if args.save:
        with open(args.save, "w") as f:
            json.dump(now, f)
        print(f"before stop: policy version {now['policy_version']}")
        return 0
    with open(args.compare) as f:
        before = json.load(f)
    same = before["policy_version"] == now["policy_version"]
    print(f"policy version: before stop {before['policy_version']}, after restart {now['policy_version']}")
    for a, b in zip(before["answers"], now["answers"]):
        gap = max((abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])), default=0.0)
        ok = a["answer"] == b["answer"] and len(a["logprobs"]) == len(b["logprobs"]) and gap <= 1e-6
        same &= ok
        print(f"  {a['question']:<16} before {a['answer']!r:<10} after {b['answer']!r:<10} max logprob gap {gap:.1e} {'same' if ok else 'DIFFERENT'}")
    print("restart check:", "same policy, same greedy answers" if same else "MISMATCH")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
