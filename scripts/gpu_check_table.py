#!/usr/bin/env python3
"""The benchmark table of scripts/gpu-check.sh, from the JSON lines its runs wrote into OUT_DIR
(bench-hicra.jsonl, bench-constrained.jsonl, bench-transformers.jsonl, train-hicra.jsonl,
train-hicra-checkpointed.jsonl, train-transformers.jsonl) and the peak GPU memory of the three training runs:

    python3 scripts/gpu_check_table.py OUT_DIR SHAPE HICRA_MIB HICRA_CHECKPOINTED_MIB REFERENCE_MIB

A missing measurement shows as "-", never as a number.
"""
import json
import math
import pathlib
import sys


def json_lines(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def number(value, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def ratio(ours, theirs, suffix: str = "") -> str:
    return f"x{ours / theirs:.2f}{suffix}" if ours and theirs else "-"


def main() -> int:
    out, shape = pathlib.Path(sys.argv[1]), sys.argv[2]
    ours_mib, checkpointed_mib, theirs_mib = (float(v) or None for v in sys.argv[3:6])
    ours = {r["batch"]: r for r in json_lines(out / "bench-hicra.jsonl")}
    theirs = {r["batch"]: r for r in json_lines(out / "bench-transformers.jsonl")}
    rows = [f"| {shape}, random weights, bf16 | hicra | transformers + PEFT | hicra / transformers |", "|---|---:|---:|---:|"]
    for batch in (1, 16, 64):
        a, b = ours.get(batch, {}).get("decode_tokens_per_s"), theirs.get(batch, {}).get("decode_tokens_per_s")
        rows.append(f"| decode tok/s, batch {batch} | {number(a)} | {number(b)} | {ratio(a, b)} |")
    constrained = {r["batch"]: r for r in json_lines(out / "bench-constrained.jsonl")}
    for batch in (1, 16, 64):
        r = constrained.get(batch, {})
        free, masked, added = r.get("decode_ms_per_step"), r.get("constrained_decode_ms_per_step"), r.get("constrained_extra_ms_per_token")
        shown = f"{masked:.2f} ({free:.2f} free, {added:+.3f} ms/token)" if None not in (masked, free, added) else "-"
        rows.append(f"| decode ms/step under a JSON grammar, batch {batch} | {shown} | - | - |")
    a, b = ours.get(64, {}).get("prefill_tokens_per_s"), theirs.get(64, {}).get("prefill_tokens_per_s")
    rows.append(f"| prefill tok/s, 64 x 128 tokens | {number(a)} | {number(b)} | {ratio(a, b)} |")
    theirs_train = (json_lines(out / "train-transformers.jsonl") or [{}])[-1].get("step_seconds")
    for label, name, mib in (("", "train-hicra.jsonl", ours_mib), (", activation checkpointing", "train-hicra-checkpointed.jsonl", checkpointed_mib)):
        step = (json_lines(out / name) or [{}])[-1].get("step_seconds")
        rows.append(f"| training step{label}, 8 x (512 + 512) tokens, s | {number(step, 3)} | {number(theirs_train, 3)} | {ratio(step, theirs_train)} |")
        rows.append(f"| training step{label}, peak GPU memory (nvidia-smi), MiB | {number(mib, 0)} | {number(theirs_mib, 0)} | {ratio(mib, theirs_mib)} |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
