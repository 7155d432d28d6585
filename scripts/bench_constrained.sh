#!/usr/bin/env bash
# The cost of constrained decoding (structured outputs): `hicra bench --constrained` decodes
# the same batch twice, free and with every row under a JSON grammar (records one per line,
# so every step computes a mask inside a JSON value), and reports the difference per token;
# scripts/bench_constrained_reference.py does the same with llama.cpp's grammar sampler on the
# F32 copy of the model, in the same run. Then the README's block `constrained-bench` shows
# this run. About three minutes on 2 CPU cores.
#
#   scripts/bench_constrained.sh                 # README updated
#   scripts/bench_constrained.sh --device cuda --batch 1,32   # `hicra bench` flags instead (README untouched)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh >&2
cargo build --release --bin hicra >&2
out=target/bench-constrained
mkdir -p "$out"
commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- core || echo "+changes")
rm -f "$out/reference.jsonl"
# The README's run is on the CPU beside llama.cpp's CPU build; flags given replace that.
defaults=(--device cpu --batch 1,8,32 --prompt-tokens 64 --decode-tokens 64 --repeats 5)
if [ "$#" -gt 0 ]; then defaults=(); fi
target/release/hicra bench "${defaults[@]}" --constrained --json "$@" > "$out/bench.jsonl"
if [ "$#" -eq 0 ]; then
  scripts/install_bench_references.sh
  .deps/venv/bin/python scripts/bench_constrained_reference.py --batch 1,8,32 --prompt-tokens 64 --decode-tokens 64 --repeats 5 --threads "$(nproc)" > "$out/reference.jsonl"
fi
.deps/venv/bin/python - "$out/bench.jsonl" "$out/reference.jsonl" "$commit" "$(nproc)" > "$out/readme_block.md" <<'PY'
import json, os, sys
def load(path):
    return {r["batch"]: r for r in (json.loads(l) for l in open(path) if l.strip())} if os.path.exists(path) else {}
ours, ref = load(sys.argv[1]), load(sys.argv[2])
print(f"Measured by `scripts/bench_constrained.sh` at commit {sys.argv[3]} on {sys.argv[4]} CPU cores, default model, f32")
print("(llama.cpp: its F32 copy), 64 prompt and 64 generated tokens per row, greedy, fastest of 5 runs;")
print("ms per decode step free and with every row under a JSON-records grammar (llama.cpp: its GBNF from")
print("the same schema, one grammar sampler per sequence); x = llama.cpp / hicra:")
print()
print("| batch | hicra free | hicra constrained | hicra added per token | llama.cpp free | llama.cpp constrained | llama.cpp added per token | added x |")
print("|---|---|---|---|---|---|---|---|")
for b, r in sorted(ours.items()):
    line = f"| {b} | {r['decode_ms_per_step']:.2f} | {r['constrained_decode_ms_per_step']:.2f} | {r['constrained_extra_ms_per_token']:.3f} ms |"
    o = ref.get(b)
    if o:
        ratio = o["constrained_extra_ms_per_token"] / r["constrained_extra_ms_per_token"] if r["constrained_extra_ms_per_token"] > 0 else float("nan")
        line += f" {o['decode_ms_per_step']:.2f} | {o['constrained_decode_ms_per_step']:.2f} | {o['constrained_extra_ms_per_token']:.3f} ms | {ratio:.1f} |"
    else:
        line += " | | | |"
    print(line)
PY
cat "$out/readme_block.md"
if [ "$#" -eq 0 ]; then
  .deps/venv/bin/python scripts/readme_splice.py constrained-bench "$out/readme_block.md"
fi
