#!/usr/bin/env bash
# Training-step benchmark: hicra's in-place LoRA step (plain, and with activation checkpointing)
# vs transformers + PEFT on the same libtorch, same model, same batch, same micro-batches, same
# LoRA, in one run. Prints a markdown table with time and peak-memory ratios.
#
#   scripts/bench_train.sh                       # default model, 8 x (64 + 64) tokens
#   BENCH_SHAPE=qwen2.5-0.5b BENCH_PROMPT_TOKENS=512 BENCH_COMPLETION_TOKENS=512 \
#     BENCH_MICRO_BATCH=2 BENCH_STEPS=1 BENCH_NO_WARMUP=1 scripts/bench_train.sh
#
# Other knobs: BENCH_BATCH (8), BENCH_RANK (16), BENCH_STEPS (3). Peak memory is the process's
# peak resident memory (model load included) on the CPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh --reference >&2
.deps/venv/bin/python -m pip --disable-pip-version-check -q install --no-deps -r scripts/bench-requirements.txt >&2
cargo build --release -p hicra-core >&2
args=(--batch "${BENCH_BATCH:-8}" --prompt-tokens "${BENCH_PROMPT_TOKENS:-64}" --completion-tokens "${BENCH_COMPLETION_TOKENS:-64}"
      --rank "${BENCH_RANK:-16}" --steps "${BENCH_STEPS:-3}" --micro-batch "${BENCH_MICRO_BATCH:-8}")
[ -n "${BENCH_SHAPE:-}" ] && args+=(--shape "$BENCH_SHAPE")
[ -n "${BENCH_NO_WARMUP:-}" ] && args+=(--no-warmup)
mkdir -p target/bench
out=target/bench/train.jsonl
{
  target/release/hicra bench-train --device cpu "${args[@]}" 2>/dev/null | tail -n 1
  target/release/hicra bench-train --device cpu "${args[@]}" --activation-checkpointing 2>/dev/null | tail -n 1
  .deps/venv/bin/python scripts/bench_train_reference.py "${args[@]}" 2>/dev/null | tail -n 1
} > "$out"
.deps/venv/bin/python - "$out" <<'PY'
import json, sys
ours, checkpointed, theirs = (json.loads(line) for line in open(sys.argv[1]))
model = theirs.get("shape") or "smollm2-135m-instruct"
print(f"training step: {model}, B={ours['batch']} x ({ours['prompt_tokens']} prompt + {ours['completion_tokens']} completion) tokens, "
      f"micro-batches of {ours['micro_batch']}, LoRA r={ours['rank']} on all seven projections, f32, CPU ({theirs['threads']} threads)")
print()
print("| engine | step s | trained tok/s | peak RSS MiB | time vs transformers | memory vs transformers |")
print("|---|---:|---:|---:|---:|---:|")
rows = [("hicra", ours, ours["peak_rss_mib"]), ("hicra, activation checkpointing", checkpointed, checkpointed["peak_rss_mib"]),
        ("transformers + PEFT (logits_to_keep)", theirs, theirs["peak_memory_mib"])]
for name, r, mib in rows:
    print(f"| {name} | {r['step_seconds']:.2f} | {r['trained_tokens_per_s']:.1f} | {mib:,.0f} | "
          f"x{r['step_seconds'] / theirs['step_seconds']:.2f} | x{mib / theirs['peak_memory_mib']:.2f} |")
PY
