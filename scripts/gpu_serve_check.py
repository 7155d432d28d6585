#!/usr/bin/env python3
"""Serving checks for scripts/gpu-check.sh: a real `hicra serve` on the GPU, driven through the
official `openai` client (raw HTTP when the client is not installed).

1. greedy: `hicra serve --device DEVICE --dtype f32` answers a greedy completion with exactly the
   tokens `hicra generate --device cpu` produces for the same prompt;
2. online step: `hicra serve --device DEVICE --dtype bf16` with training samples a group, takes
   the rewards, runs one step, and reports the sampler/trainer probability-ratio statistics.

Prints one JSON line per check. Uses only the standard library besides the optional client.

    python3 scripts/gpu_serve_check.py --hicra target/release/hicra --model core/tests/fixtures/parity/llama/model.gguf
"""
import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time
import urllib.request

PROMPT = "The quick brown fox"


def start(hicra: str, model: str, device: str, dtype: str, state: pathlib.Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [hicra, "serve", "--device", device, "--dtype", dtype, "--model", model, "--port", "0", "--state-dir", str(state), "--max-context", "256", *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        if line.startswith("listening on "):
            return proc, line.split()[-1].strip()
        seen.append(line)
    raise SystemExit(f"hicra serve exited before listening:\n{''.join(seen)}")


def post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.load(reply)


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=60) as reply:
        return json.load(reply)


def complete(url: str, body: dict) -> tuple[dict, str]:
    """A completion through the openai client when it is installed, else raw HTTP."""
    try:
        import openai
    except ImportError:
        return post(url, "/v1/completions", body), "raw HTTP (openai client not installed)"
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    extra = {k: v for k, v in body.items() if k not in ("model", "prompt", "max_tokens", "temperature", "n", "logprobs")}
    reply = client.completions.create(model=body["model"], prompt=body["prompt"], max_tokens=body["max_tokens"], temperature=body["temperature"],
                                      n=body.get("n", 1), logprobs=body.get("logprobs"), extra_body=extra or None)
    return reply.model_dump(), f"openai {openai.__version__}"


def greedy_check(a, state: pathlib.Path) -> dict:
    expected = json.loads(subprocess.run([a.hicra, "generate", "--device", "cpu", "--dtype", "f32", "--model", a.model, "--prompt", PROMPT, "--max-tokens", "16", "--json"],
                                         check=True, capture_output=True, text=True).stdout)
    proc, url = start(a.hicra, a.model, a.device, "f32", state, [])
    try:
        model = get(url, "/v1/models")["data"][0]["id"]
        reply, client = complete(url, {"model": model, "prompt": PROMPT, "max_tokens": 16, "temperature": 0})
        text = reply["choices"][0]["text"]
        ok = text == expected["text"]
        return {"check": "greedy through hicra serve (f32)", "ok": ok, "client": client, "equal to the CPU's": ok,
                "served": ascii(text[:24]), **({} if ok else {"cpu": ascii(expected["text"][:24])})}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def training_check(a, state: pathlib.Path) -> dict:
    state.mkdir(parents=True, exist_ok=True)
    config = state / "trainer.toml"
    config.write_text("[optim]\nlr = 1e-3\n[lora]\nrank = 8\n")
    proc, url = start(a.hicra, a.model, a.device, "bf16", state / "state", ["--train-config", str(config), "--groups-per-step", "1"])
    try:
        model = get(url, "/v1/models")["data"][0]["id"]
        reply, client = complete(url, {"model": model, "prompt": PROMPT, "max_tokens": 24, "temperature": 1.0, "n": 8, "seed": 7})
        ids = [c["hicra"]["rollout_id"] for c in reply["choices"]] if "hicra" in reply["choices"][0] else None
        if ids is None:  # the openai client keeps unknown fields in model_extra; model_dump includes them
            raise SystemExit(f"no rollout ids in the reply: {reply}")
        post(url, "/v1/rewards", {"rewards": [{"rollout_id": r, "reward": float(i % 2)} for i, r in enumerate(ids)]})
        deadline = time.time() + 120
        while time.time() < deadline:
            status = get(url, "/v1/training")
            steps = status.get("last_steps") or []
            if steps:
                step = steps[-1]
                return {"check": "online step (bf16)", "ok": bool(step.get("updated")), "client": client,
                        "ratio_deviation_mean": step.get("ratio_deviation_mean"), "ratio_deviation_max": step.get("ratio_deviation_max"),
                        "clip_fraction": step.get("clip_fraction"), "step_seconds": step.get("step_seconds"), "tokens": step.get("tokens")}
            time.sleep(0.2)
        return {"check": "online step (bf16)", "ok": False, "error": "no step within 120 s"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hicra", default="target/release/hicra")
    p.add_argument("--model", default="core/tests/fixtures/parity/llama/model.gguf")
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for check in (greedy_check, training_check):
            try:
                result = check(a, pathlib.Path(tmp) / check.__name__)
            except Exception as err:  # report and go on: one table shows every check
                result = {"check": check.__name__, "ok": False, "error": repr(err)[:500]}
            failed |= not result["ok"]
            print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
