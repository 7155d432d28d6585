#!/usr/bin/env python3
"""Online HICRA against a running `hicra serve --train`: ask, verify, reward, repeat.

The agent loop a user would write: each round asks a few arithmetic questions with n samples
each through the official OpenAI client, checks every answer, and posts the rewards to
`/v1/rewards`. The server groups the n choices of each request; the reward reply returns at once
with each group's status. Once `--groups-per-step` groups are complete, the server's step worker
runs one HICRA step on the engine thread and serves the next request with the updated adapters
(the `policy_version` of each response says which). The client waits for that step by polling
`GET /v1/training` and prints its report. Greedy accuracy on held-out questions is measured
before and after.

    .deps/venv/bin/python examples/online_arithmetic/client.py --url http://127.0.0.1:8000 --rounds 8
"""
import argparse
import json
import random
import re
import sys
import time

import httpx
from openai import OpenAI

SYSTEM = "You are a calculator. Reply with the result only."


def question(rng: random.Random):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"What is {a} + {b}?", a + b


def last_number(text: str):
    found = re.findall(r"-?\d+", text or "")
    return int(found[-1]) if found else None


def accuracy(client, model, items, max_tokens):
    correct = 0
    for prompt, answer in items:
        r = client.chat.completions.create(model=model, temperature=0, max_tokens=max_tokens,
                                           messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}])
        correct += last_number(r.choices[0].message.content) == answer
    return correct / len(items)


def training_status(http) -> dict:
    return http.get("/v1/training").raise_for_status().json()


def finished_steps(status: dict) -> int:
    counters = status["counters"]
    return counters["steps"] + counters["failed_steps"]


def wait_for_steps(http, steps: int, timeout_s: float = 600.0) -> dict:
    """Polls `GET /v1/training` until `steps` steps have finished (ran or failed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = training_status(http)
        if finished_steps(status) >= steps:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"step {steps} did not finish within {timeout_s:.0f} s: {json.dumps(status)}")
        time.sleep(0.1)


def describe_step(step: dict) -> str:
    if "error" in step:
        return f"step failed: {step['error']}"
    return (f"step {'updated' if step.get('updated') else 'skipped'} (zero-variance groups {step.get('zero_variance_groups', '-')},"
            f" loss {step.get('loss', float('nan')):+.4f}, planning share {step.get('planning_share', float('nan')):.3f},"
            f" {step.get('step_seconds', float('nan')):.1f}s)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default="none")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--questions", type=int, default=4, help="questions per round (groups per step)")
    p.add_argument("--samples", type=int, default=8, help="choices per question (group size)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--eval", type=int, default=24, help="held-out questions for greedy accuracy")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    client = OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key, max_retries=0, timeout=600)
    http = httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {args.api_key}"}, timeout=600)
    model = client.models.list().data[0].id
    rng = random.Random(args.seed)
    held_out = [question(random.Random(10_000 + i)) for i in range(args.eval)]
    before = accuracy(client, model, held_out, args.max_tokens)
    print(f"greedy accuracy before: {before:.3f} on {len(held_out)} held-out questions", flush=True)
    for round_ in range(1, args.rounds + 1):
        rewards, scores, version = [], [], None
        for _ in range(args.questions):
            prompt, answer = question(rng)
            r = client.chat.completions.create(model=model, n=args.samples, temperature=1.0, max_tokens=args.max_tokens,
                                               seed=rng.randrange(2**31),
                                               messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}])
            for choice in r.choices:
                score = 1.0 if last_number(choice.message.content) == answer else 0.0
                ext = choice.model_extra["hicra"]
                version = ext["policy_version"]
                rewards.append({"rollout_id": ext["rollout_id"], "reward": score})
                scores.append(score)
        before_reward = training_status(http)
        reply = http.post("/v1/rewards", json={"rewards": rewards}).raise_for_status().json()
        # The reply only says which groups are complete; the steps they make run on the server's
        # step worker. Wait for as many as the complete groups fill, then report the newest.
        per_step = before_reward["settings"]["groups_per_step"]
        new_steps = (before_reward["ready_groups"] + reply["groups_completed"]) // per_step
        mean = sum(scores) / len(scores)
        if new_steps == 0:
            status = training_status(http)
            print(f"round {round_:>2}: sampled with policy v{version}, mean reward {mean:.3f}"
                  f" -> no step yet ({status['ready_groups']} of {per_step} groups ready), serving v{status['policy_version']}", flush=True)
            continue
        status = wait_for_steps(http, finished_steps(before_reward) + new_steps)
        step = status["last_steps"][-1] if status["last_steps"] else {}
        print(f"round {round_:>2}: sampled with policy v{version}, mean reward {mean:.3f}"
              f" -> {describe_step(step)}, now serving v{status['policy_version']}", flush=True)
    after = accuracy(client, model, held_out, args.max_tokens)
    print(f"greedy accuracy after:  {after:.3f} (before {before:.3f})", flush=True)
    print(json.dumps({"accuracy_before": before, "accuracy_after": after, "rounds": args.rounds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
