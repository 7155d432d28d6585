#!/usr/bin/env bash
# The default credit-scheme comparison: GRPO vs HICRA vs entropy-gated, 3 seeds each, on the
# default model and the graded word problems (examples/credit_comparison). About an hour on
# 2 CPU cores; resumable (a second call skips finished runs). Then the README's table and
# chart are replaced with what this run measured.
#
#   scripts/compare_credit.sh                  # runs/credit-comparison, README updated
#   scripts/compare_credit.sh --set steps=32   # any `hicra compare` flags (README untouched)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh >&2
cargo build --release -p hicra-core >&2
out=runs/credit-comparison
# The commit the runs are made with (the README names it, not a later one).
commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- core examples/credit_comparison || echo "+changes")
started=$(date +%s)
target/release/hicra compare --config examples/credit_comparison/sweep.toml --out "$out" "$@"
minutes=$(( ($(date +%s) - started + 30) / 60 ))
if [ "$#" -gt 0 ]; then
  echo "[compare-credit] flags given: the README keeps its published comparison" >&2
  exit 0
fi
results=examples/credit_comparison/results
mkdir -p "$results"
cp "$out/compare.md" "$out/compare.json" "$out/pass1.png" "$out/pass1.svg" "$out/pass_k.png" "$out/pass_k.svg" "$results/"
{
  echo "Measured by \`scripts/compare_credit.sh\` at commit ${commit} on $(nproc) CPU cores"
  echo "(this call: ${minutes} min; finished runs are skipped, so a resumed call takes less)."
  echo
  cat "$out/compare.md"
  echo
  echo "![held-out pass@1 of each arm over steps, mean over seeds with its 95% bootstrap band]($results/pass1.png)"
} > "$out/readme_block.md"
.deps/venv/bin/python scripts/readme_splice.py credit-comparison "$out/readme_block.md"
