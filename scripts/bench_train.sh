#!/usr/bin/env bash
# Training-step benchmark: hicra's in-place LoRA step vs transformers + PEFT on the same
# libtorch, same model, same batch, same LoRA, in one run. Prints a table and the ratio.
#   BENCH_BATCH=8 BENCH_PROMPT_TOKENS=64 BENCH_COMPLETION_TOKENS=64 BENCH_RANK=16 BENCH_STEPS=3
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh --reference >&2
.deps/venv/bin/python -m pip --disable-pip-version-check -q install --no-deps -r scripts/bench-requirements.txt >&2
cargo build --release -p hicra-core >&2
args=(--batch "${BENCH_BATCH:-8}" --prompt-tokens "${BENCH_PROMPT_TOKENS:-64}" --completion-tokens "${BENCH_COMPLETION_TOKENS:-64}" --rank "${BENCH_RANK:-16}" --steps "${BENCH_STEPS:-3}")
mkdir -p target/bench
ours="$(target/release/hicra bench-train --device cpu "${args[@]}" 2>/dev/null | tail -n 1)"
theirs="$(.deps/venv/bin/python scripts/bench_train_reference.py "${args[@]}" 2>/dev/null | tail -n 1)"
printf '%s\n%s\n' "$ours" "$theirs" > target/bench/train.jsonl
.deps/venv/bin/python - "$ours" "$theirs" <<'PY'
import json, sys
ours, theirs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"training step: B={ours['batch']} x ({ours['prompt_tokens']} prompt + {ours['completion_tokens']} completion) tokens, LoRA r={ours['rank']}, f32, CPU")
print("| engine | step s | trained tok/s | adapter values |")
print("|---|---:|---:|---:|")
for r in (ours, theirs):
    print(f"| {r['engine']} | {r['step_seconds']:.2f} | {r['trained_tokens_per_s']:.1f} | {r['adapter_values']} |")
print(f"ratio hicra / transformers+peft (tokens/s): x{ours['trained_tokens_per_s'] / theirs['trained_tokens_per_s']:.2f}")
PY
