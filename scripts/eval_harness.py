#!/usr/bin/env python3
"""lm-evaluation-harness against `hicra serve`, side by side with the harness's `hf` backend.

Both sides get the same weights: an HF folder that transformers writes from the default GGUF
(dequantized to f32), which `hicra serve` loads too. Three pairs of runs, one process each:

  loglikelihood   hicra_facts (100 x 4-way multiple choice)  hf  vs  local-completions
  generate_until  hicra_sums  (50 sums, greedy)              hf  vs  local-completions
  chat            hicra_sums with --apply_chat_template      hf  vs  local-chat-completions

For each pair it prints the harness's own table for both backends, then one comparison line:
accuracy on both sides, the largest per-request loglikelihood difference (every choice of every
question), and how many greedy generations are identical. It exits 1 when an accuracy differs
or a loglikelihood differs by more than --tolerance (1e-4).

The tasks live in examples/eval_harness/tasks (local JSONL, no downloads). Run through
scripts/eval_harness.sh, which installs the harness, builds hicra and writes the HF export.

  .deps/venv/bin/python scripts/eval_harness.py --hf-dir .deps/models/smollm2-135m-instruct-hf \
      [--hicra target/release/hicra] [--limit N] [--out target/eval-harness]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = ROOT / "examples" / "eval_harness" / "tasks"
MODEL_ID = "smollm2-135m-instruct-hf"

sys.path.insert(0, str(ROOT / "scripts"))
from torch_stubs import ensure_torch_importable  # noqa: E402


def log(msg: str) -> None:
    print(f"[eval-harness] {msg}", file=sys.stderr, flush=True)


def export_hf(gguf: Path, out: Path) -> None:
    """Writes the HF folder transformers builds from the GGUF (f32), once."""
    if (out / "model.safetensors").is_file():
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"exporting {gguf} to {out} with transformers")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers' GGUF reader names <|im_start|> (the GGUF's BOS) as the EOS token, while the
    # model's config says id 2 (<|im_end|>), as the original repository does; fix the name so
    # both backends stop where the model ends its turn.
    eos_id = model.config.eos_token_id
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def hicra_server(binary: Path, hf_dir: Path, log_path: Path) -> Iterator[str]:
    port = free_port()
    cmd = [str(binary), "serve", "--model", str(hf_dir), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]
    log(f"starting {shlex.join(cmd)} (log: {log_path})")
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"hicra serve exited with {proc.returncode}; see {log_path}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"hicra serve not healthy after 120 s; see {log_path}")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def evaluate(model: str, model_args: str, task: str, chat: bool, limit: int | None) -> dict:
    """One harness run through its Python entry point (what the `lm_eval` command calls)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    command = f"lm_eval --model {model} --model_args {model_args} --tasks {task} --include_path {TASKS_DIR.relative_to(ROOT)}"
    if chat:
        command += " --apply_chat_template"
    log(f"running: {command}")
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[task],
        batch_size=8,
        device="cpu",
        limit=limit,
        log_samples=True,
        apply_chat_template=chat,
        task_manager=TaskManager(include_path=str(TASKS_DIR)),
    ) | {"command": command}


def per_request(samples: list[dict]) -> dict[tuple[int, int], object]:
    """(doc_id, request index) -> the backend's raw answer (loglikelihood or generated text)."""
    out = {}
    for sample in samples:
        for index, resp in enumerate(sample["resps"]):
            out[(sample["doc_id"], index)] = resp[0]
    return out


def compare(task: str, metric: str, ours: dict, theirs: dict) -> dict:
    ours_req = per_request(ours["samples"][task])
    theirs_req = per_request(theirs["samples"][task])
    if ours_req.keys() != theirs_req.keys():
        raise SystemExit(f"{task}: the backends answered different requests")
    metric_key = f"{metric},none" if f"{metric},none" in ours["results"][task] else next(k for k in ours["results"][task] if k.startswith(metric + ","))
    row = {
        "task": task,
        "metric": metric,
        "hf": ours["results"][task][metric_key],
        "hicra": theirs["results"][task][metric_key],
        "requests": len(ours_req),
    }
    first = next(iter(ours_req.values()))
    if isinstance(first, (list, tuple)):
        diffs = [abs(float(ours_req[k][0]) - float(theirs_req[k][0])) for k in ours_req]
        row["max_abs_loglikelihood_diff"] = max(diffs)
        row["greedy_flags_equal"] = sum(bool(ours_req[k][1]) == bool(theirs_req[k][1]) for k in ours_req)
    else:
        row["identical_generations"] = sum(ours_req[k] == theirs_req[k] for k in ours_req)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", type=Path, default=ROOT / ".deps/models/smollm2-135m-instruct-hf")
    parser.add_argument("--gguf", type=Path, default=ROOT / ".deps/models/smollm2-135m-instruct.gguf")
    parser.add_argument("--hicra", type=Path, default=ROOT / "target/release/hicra")
    parser.add_argument("--out", type=Path, default=ROOT / "target/eval-harness")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ensure_torch_importable()
    export_hf(args.gguf, args.hf_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    from lm_eval.utils import make_table

    hf_args = f"pretrained={args.hf_dir},dtype=float32"
    pairs = [
        ("hicra_facts", "acc", False, "local-completions", "/v1/completions"),
        ("hicra_sums", "exact_match", False, "local-completions", "/v1/completions"),
        ("hicra_sums", "exact_match", True, "local-chat-completions", "/v1/chat/completions"),
    ]
    rows = []
    report = []  # the markdown the README shows: both tables of each pair, then the comparison
    with hicra_server(args.hicra, args.hf_dir, args.out / "hicra-serve.log") as url:
        for task, metric, chat, api_model, route in pairs:
            api_args = (
                f"model={MODEL_ID},base_url={url}{route},tokenizer_backend=huggingface,"
                f"tokenizer={args.hf_dir},num_concurrent=4,max_retries=1"
            )
            reference = evaluate("hf", hf_args, task, chat, args.limit)
            served = evaluate(api_model, api_args, task, chat, args.limit)
            label = f"{task}{' (chat)' if chat else ''}"
            report.append(f"**{label}**, harness `hf` backend (transformers):\n\n{make_table(reference)}")
            report.append(f"**{label}**, harness `{api_model}` against `hicra serve`:\n\n{make_table(served)}")
            rows.append(compare(task, metric, reference, served) | {"chat": chat, "backend": api_model})

    failed = False
    table = [
        "| task | backend against hicra | metric | `hf` | hicra | requests | agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "max_abs_loglikelihood_diff" in row:
            agreement = (
                f"largest loglikelihood difference {row['max_abs_loglikelihood_diff']:.1e}; "
                f"is_greedy equal {row['greedy_flags_equal']}/{row['requests']}"
            )
            failed |= row["max_abs_loglikelihood_diff"] > args.tolerance
        else:
            agreement = f"identical generations {row['identical_generations']}/{row['requests']}"
        failed |= row["hf"] != row["hicra"]
        task = row["task"] + (" (chat)" if row["chat"] else "")
        table.append(f"| {task} | `{row['backend']}` | {row['metric']} | {row['hf']:.4f} | {row['hicra']:.4f} | {row['requests']} | {agreement} |")
    verdict = (
        f"FAILED: an accuracy differs or a loglikelihood differs by more than {args.tolerance}"
        if failed
        else f"Same accuracy on every task; every loglikelihood within {args.tolerance}."
    )
    text = "\n".join(table) + f"\n\n{verdict}\n\n" + "\n".join(report)
    (args.out / "report.md").write_text(text)
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2))
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
