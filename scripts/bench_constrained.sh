#!/usr/bin/env bash
# The cost of constrained decoding (structured outputs): `hicra bench --constrained` decodes
# the same batch twice, free and with every row under a JSON grammar (records one per line,
# so every step computes a mask inside a JSON value), and reports the difference per token.
# Then the README's block `constrained-bench` shows this run. About a minute on 2 CPU cores.
#
#   scripts/bench_constrained.sh                 # README updated
#   scripts/bench_constrained.sh --device cuda   # more `hicra bench` flags (README untouched)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo build --release --bin hicra >&2
out=target/bench-constrained
mkdir -p "$out"
commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- core || echo "+changes")
target/release/hicra bench --device cpu --batch 1,8,32 --prompt-tokens 64 --decode-tokens 64 --repeats 3 --constrained --json "$@" > "$out/bench.jsonl"
.deps/venv/bin/python - "$out/bench.jsonl" "$commit" "$(nproc)" > "$out/readme_block.md" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"Measured by `scripts/bench_constrained.sh` at commit {sys.argv[2]} on {sys.argv[3]} CPU cores, default model, f32,")
print("64 prompt and 64 generated tokens per row, greedy, fastest of 3 runs:")
print()
print("| batch | free ms/step | constrained ms/step | added per token | added per step |")
print("|---|---|---|---|---|")
for r in rows:
    added = r["constrained_decode_ms_per_step"] - r["decode_ms_per_step"]
    print(f"| {r['batch']} | {r['decode_ms_per_step']:.2f} | {r['constrained_decode_ms_per_step']:.2f} | {r['constrained_extra_ms_per_token']:.3f} ms | {100 * added / r['decode_ms_per_step']:+.1f}% |")
PY
cat "$out/readme_block.md"
if [ "$#" -eq 0 ]; then
  .deps/venv/bin/python scripts/readme_splice.py constrained-bench "$out/readme_block.md"
fi
