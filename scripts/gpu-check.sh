#!/usr/bin/env bash
# CUDA checks for a lent GPU machine, run from the repository root with the binaries built
# here carried along (target/release/hicra and the parity test binary):
#   cargo build --release && cargo test --release --no-run
#   carry: target/release/hicra, target/release/deps/parity-<hash>
# It finds the machine's libtorch 2.11 (HICRA_LIBTORCH_LIB, else the torch of python3, else
# /opt/torch/...), runs the parity tests on CUDA in f32, then a bf16 benchmark on the default
# model when that model is present (it is 94 MB, over the carry limit, so usually it is not),
# and prints a summary table.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

lib="${HICRA_LIBTORCH_LIB:-}"
if [ -z "$lib" ]; then
  lib="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null || true)"
fi
[ -n "$lib" ] || lib=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
export LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}"
echo "libtorch: $lib"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

declare -a rows
record() { rows+=("$(printf '| %-34s | %-6s | %s |' "$1" "$2" "$3")"); }

parity="$(ls target/release/deps/parity-* 2>/dev/null | grep -v '\.d$' | head -n 1)"
if [ -n "$parity" ]; then
  if out="$(HICRA_TEST_DEVICE=cuda timeout 300 "$parity" --nocapture 2>&1)"; then
    record "parity on cuda (f32)" ok "$(echo "$out" | grep -c 'max |logprob') comparisons, worst $(echo "$out" | grep -o 'transformers| = [0-9.e-]*' | sort -t= -k2 -g | tail -n 1)"
  else
    record "parity on cuda (f32)" FAIL "see log above"; echo "$out"
  fi
else
  record "parity on cuda (f32)" skip "no parity test binary carried"
fi

model="${HICRA_MODEL:-smollm2-135m-instruct}"
if answer="$(timeout 120 target/release/hicra generate --device cuda --chat --prompt 'What is the capital of France?' --max-tokens 32 --model "$model" 2>&1)"; then
  case "$answer" in *Paris*) record "greedy chat on cuda (bf16)" ok "$(echo "$answer" | tail -n 1)";; *) record "greedy chat on cuda (bf16)" FAIL "$answer";; esac
  bench="$(timeout 300 target/release/hicra bench --device cuda --dtype bf16 --batch 1,8,32 --model "$model" 2>&1)"
  echo "$bench"
  record "bench on cuda (bf16)" done "table above"
else
  record "greedy chat on cuda (bf16)" skip "model $model not available: $(echo "$answer" | tail -n 1)"
fi

echo
echo "| check                              | result | detail |"
echo "|------------------------------------|--------|--------|"
printf '%s\n' "${rows[@]}"
