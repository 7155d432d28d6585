#!/usr/bin/env bash
# lm-evaluation-harness against `hicra serve`, side by side with the harness's `hf` backend on
# the same weights (scripts/eval_harness.py says what runs and what is compared). Not part of
# scripts/test.sh: the harness is a heavy install (pip, once, into .deps/venv: lm_eval 0.4.13
# and its dependencies, with torch and transformers held at the pins of the fixtures).
# About 5 minutes on 2 CPU cores. Then the README's "Evaluating" block shows this run's tables.
#
#   scripts/eval_harness.sh              # all documents, README updated
#   scripts/eval_harness.sh --limit 10   # any scripts/eval_harness.py flags (README untouched)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh --reference >&2   # transformers and gguf: the hf backend and the export
marker=.deps/.installed-eval
want="$(cat scripts/eval-requirements.txt scripts/fixtures/requirements-fixtures.txt)"
if [ ! -f "$marker" ] || [ "$(cat "$marker")" != "$want" ]; then
  echo "[eval-harness] pip install lm-evaluation-harness (once)" >&2
  .deps/venv/bin/python -m pip --disable-pip-version-check -q install \
    -r scripts/eval-requirements.txt -c scripts/fixtures/requirements-fixtures.txt
  printf '%s' "$want" > "$marker"
fi
cargo build --release --bin hicra >&2
out=target/eval-harness
mkdir -p "$out"
commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- core scripts/eval_harness.py examples/eval_harness || echo "+changes")
started=$(date +%s)
rc=0
.deps/venv/bin/python scripts/eval_harness.py --out "$out" "$@" || rc=$?
if [ "$#" -gt 0 ] || [ ! -f "$out/report.md" ]; then
  exit "$rc"
fi
minutes=$(( ($(date +%s) - started + 30) / 60 ))
{
  echo "Measured by \`scripts/eval_harness.sh\` at commit ${commit} on $(nproc) CPU cores (${minutes} min),"
  echo "lm_eval $(.deps/venv/bin/python -c 'import importlib.metadata as m; print(m.version("lm_eval"))'),"
  echo "default model exported to an HF folder by transformers (f32), CPU on both sides:"
  echo
  cat "$out/report.md"
} > "$out/readme_block.md"
.deps/venv/bin/python scripts/readme_splice.py eval-harness "$out/readme_block.md"
exit "$rc"
