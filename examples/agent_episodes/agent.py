#!/usr/bin/env python3
"""An agent trained online through `hicra serve --train`, one reward per multi-turn episode.

The environment is a quiz master. An episode has `--turns` turns. Each turn asks a small
addition; from the second turn on, the question comes with feedback on the previous answer
("Correct." or "Wrong: it was 9."). The agent is the model behind an unchanged `openai` client:
it keeps the whole conversation in `messages` and names its episode with
`extra_body={"hicra": {"episode_id": ...}}`. The server splices the exact tokens it served into
each turn's prompt, so the episode is one token sequence. Only the model's own tokens are
trained; the quiz master's text is context.

When an episode ends, the agent posts one reward, the share of correct answers, to
`POST /v1/episodes/{id}/reward`. `--episodes` episodes of the same task share a `group_id`,
which makes them one GRPO group. Each round runs `--tasks` tasks concurrently, so there is one
group per task, and waits for the step they make. Mean episode reward per round shows
learning. Greedy episodes on held-out tasks are measured before and after.

    .deps/venv/bin/python examples/agent_episodes/agent.py --url http://127.0.0.1:8000 --rounds 6
"""
import argparse
import json
import random
import re
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
from openai import OpenAI

SYSTEM = "You are a calculator. Reply with the result only."


def last_number(text: str):
    found = re.findall(r"-?\d+", text or "")
    return int(found[-1]) if found else None


def questions(seed: int, turns: int):
    rng = random.Random(seed)
    return [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(turns)]


def run_episode(client: OpenAI, model: str, task_seed: int, turns: int, temperature: float, episode_id: str, max_tokens: int):
    """Plays one episode; returns (reward, answers)."""
    messages = [{"role": "system", "content": SYSTEM}]
    feedback, correct, answers = "", 0, []
    for a, b in questions(task_seed, turns):
        messages.append({"role": "user", "content": f"{feedback}What is {a} + {b}?"})
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=temperature,
                                           seed=random.randrange(2**31), extra_body={"hicra": {"episode_id": episode_id}})
        answer = r.choices[0].message.content or ""
        messages.append({"role": "assistant", "content": answer})
        right = last_number(answer) == a + b
        correct += right
        answers.append(answer)
        feedback = "Correct. " if right else f"Wrong: it was {a + b}. "
    return correct / turns, answers


def training_status(http) -> dict:
    return http.get("/v1/training").raise_for_status().json()


def wait_for_version(http, version: int, timeout_s: float = 900.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (status := training_status(http))["policy_version"] < version:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no policy version {version} within {timeout_s} s: {status}")
        time.sleep(0.2)
    return status


def evaluate(client, model, seeds, turns, max_tokens, pool) -> float:
    runs = pool.map(lambda s: run_episode(client, model, s, turns, 0.0, f"eval-{uuid.uuid4().hex}", max_tokens)[0], seeds)
    return sum(runs) / len(seeds)


def markdown_table(result: dict) -> str:
    """The README's table: mean sampled episode reward per round, greedy held-out reward where measured."""
    greedy = dict(result["greedy_by_round"])
    rows = ["| after round | mean episode reward (sampled, T=1) | greedy episode reward (held-out) |", "|---:|---:|---:|"]
    rows.append(f"| 0 (before) | | {greedy[0]:.3f} |")
    for round_, reward in enumerate(result["episode_reward_per_round"], start=1):
        shown = f"{greedy[round_]:.3f}" if round_ in greedy else ""
        rows.append(f"| {round_} | {reward:.3f} | {shown} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default="none")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--tasks", type=int, default=4, help="tasks per round (groups per step)")
    p.add_argument("--episodes", type=int, default=4, help="episodes per task (group size)")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--eval", type=int, default=12, help="held-out tasks played greedily before, every --eval-every rounds, and after")
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    random.seed(args.seed)
    client = OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key, max_retries=0, timeout=600)
    http = httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {args.api_key}"}, timeout=600)
    model = client.models.list().data[0].id
    pool = ThreadPoolExecutor(max_workers=args.tasks * args.episodes)
    held_out = [100_000 + i for i in range(args.eval)]
    before = evaluate(client, model, held_out, args.turns, args.max_tokens, pool)
    print(f"greedy episode reward before: {before:.3f} on {len(held_out)} held-out {args.turns}-turn episodes", flush=True)
    curve, greedy_curve = [], [(0, before)]
    for round_ in range(1, args.rounds + 1):
        version = training_status(http)["policy_version"]
        tasks = [round_ * 1000 + t for t in range(args.tasks)]
        jobs = [(task, f"r{round_}-t{task}-e{e}-{uuid.uuid4().hex[:8]}") for task in tasks for e in range(args.episodes)]
        results = list(pool.map(lambda job: run_episode(client, model, job[0], args.turns, 1.0, job[1], args.max_tokens), jobs))
        for (task, episode_id), (reward, _) in zip(jobs, results):
            http.post(f"/v1/episodes/{episode_id}/reward", json={"reward": reward, "group_id": f"round{round_}-task{task}", "group_size": args.episodes}).raise_for_status()
        mean = sum(r for r, _ in results) / len(results)
        curve.append(mean)
        groups_with_signal = sum(len({results[i][0] for i in range(k * args.episodes, (k + 1) * args.episodes)}) > 1 for k in range(args.tasks))
        if groups_with_signal:
            status = wait_for_version(http, version + 1)
            step = status["last_steps"][-1] if status["last_steps"] else {}
            print(f"round {round_:>2}: episodes sampled with policy v{version}, mean episode reward {mean:.3f}"
                  f" -> step (trained tokens {step.get('tokens')}, loss {step.get('loss', 0):+.4f}), now serving v{status['policy_version']}", flush=True)
        else:
            print(f"round {round_:>2}: episodes sampled with policy v{version}, mean episode reward {mean:.3f} -> every group had equal rewards, no step", flush=True)
        if round_ % args.eval_every == 0 or round_ == args.rounds:
            greedy = evaluate(client, model, held_out, args.turns, args.max_tokens, pool)
            greedy_curve.append((round_, greedy))
            print(f"          greedy episode reward on the held-out tasks after round {round_}: {greedy:.3f}", flush=True)
    after = greedy_curve[-1][1]
    print(f"greedy episode reward after:  {after:.3f} (before {before:.3f})", flush=True)
    result = {"episode_reward_per_round": curve, "greedy_by_round": greedy_curve, "greedy_before": before, "greedy_after": after}
    print(markdown_table(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
