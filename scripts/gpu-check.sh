#!/usr/bin/env bash
# CUDA checks for a lent GPU machine, in one call of at most 6 minutes, printing one table.
#
# Here, before the call (builds and strips the binaries into target/gpu-check/bin, ~18 MB):
#   scripts/gpu-check.sh --prepare
# On the GPU machine (device tool: carry ["target/gpu-check/bin"], timeout ~420 s):
#   scripts/gpu-check.sh
#
# It checks, each step under its own time limit, and reports what it could not do:
#   0. the machine: a Python with torch 2.11 (its torch/lib is the libtorch hicra loads, plus the
#      nvidia-* wheels' libraries), transformers, PEFT, the openai client, glibc, the GPU;
#   1. parity with transformers on the same GPU, in f32 and in bf16 (references made there by
#      scripts/gpu_parity_reference.py, compared by the parity tests);
#   2. greedy generation through `hicra serve` with the openai client, equal to the CPU's;
#   3. one online training step in bf16 with the sampler/trainer ratio statistics;
#   4. prefill, decode at batch 1, 16 and 64, and the 8 x 1024-token training step on the
#      Qwen2.5-0.5B shape in bf16, side by side with transformers + PEFT on the same GPU;
#      decode under a JSON grammar (structured outputs) at the same batch sizes.
# Environment: HICRA_GPU_PYTHON (default /opt/torch/.venv/bin/python3, else python3),
# HICRA_GPU_SHAPE (default qwen2.5-0.5b). Raw logs go to $OUT (or target/gpu-check/out).
# A dry run of the script's logic on a CPU machine: HICRA_GPU_DEVICE=cpu HICRA_GPU_SKIP_BENCH=1.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bin=target/gpu-check/bin

if [ "${1:-}" = "--prepare" ]; then
  set -e
  cargo build --release -p hicra-core
  parity="$(cargo test --release -p hicra-core --test parity --no-run --message-format=json 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)"
  [ -n "$parity" ] || { echo "could not find the parity test binary" >&2; exit 1; }
  mkdir -p "$bin"
  strip -o "$bin/hicra" target/release/hicra
  strip -o "$bin/parity" "$parity"
  # A real tokenizer (the default model's, 3.5 MB; the model itself is over the carry limit)
  # for the constrained-decoding benchmark on random weights.
  if [ ! -f "$bin/tokenizer/tokenizer.json" ]; then
    .deps/venv/bin/python - "$bin/tokenizer" <<'PY'
import sys
sys.path.insert(0, "scripts")
from torch_stubs import ensure_torch_importable
ensure_torch_importable()
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(".deps/models", gguf_file="smollm2-135m-instruct.gguf").save_pretrained(sys.argv[1])
PY
  fi
  du -ch "$bin"/* | tail -n 1
  exit 0
fi

out="${OUT:-target/gpu-check/out}"
mkdir -p "$out"
shape="${HICRA_GPU_SHAPE:-qwen2.5-0.5b}"
device="${HICRA_GPU_DEVICE:-cuda}"
declare -a rows
# Every step runs under `timeout "$(budget N)"`: N seconds, or what is left of the whole
# check's HICRA_GPU_CHECK_SECONDS (default 340), so one call stays within 6 minutes.
budget() {
  local left=$(( ${HICRA_GPU_CHECK_SECONDS:-340} - SECONDS ))
  if [ "$left" -lt 2 ]; then echo 1; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}
record() { rows+=("$(printf '| %s | %s | %s |' "$1" "$2" "$3")"); echo "[gpu-check] $1: $2 $3" >&2; }

# 0. The machine.
py="${HICRA_GPU_PYTHON:-/opt/torch/.venv/bin/python3}"
[ -x "$py" ] || py="$(command -v python3 || true)"
env_json="$("$py" - <<'PY' 2>/dev/null
import glob, importlib, json, os, sys
sys.path.insert(0, "scripts/fixtures")
try:
    import make_parity_fixtures  # noqa: F401  (CPU-only wheel: stub CUDA libraries; else no effect)
except ImportError:
    pass
import torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_lib": os.path.join(os.path.dirname(torch.__file__), "lib"),
        "nvidia_libs": sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "*", "lib")))}
for name in ("transformers", "peft", "openai"):
    try:
        info[name] = importlib.import_module(name).__version__
    except Exception:
        info[name] = None
print(json.dumps(info))
PY
)"
if [ -z "$env_json" ]; then
  record "environment" FAIL "no Python with torch at $py: no libtorch to load, no transformers reference"
  field() { echo ""; }
else
  field() { echo "$env_json" | "$py" -c "import json,sys; v=json.load(sys.stdin).get('$1'); print(':'.join(v) if isinstance(v, list) else ('' if v is None else v))"; }
fi
torch_version="$(field torch)"
case "$torch_version" in 2.11.*) ;; *) [ -n "$env_json" ] && record "environment" WARN "torch $torch_version, not 2.11: hicra is built against libtorch 2.11";; esac
export LD_LIBRARY_PATH="${HICRA_LIBTORCH_LIB:-$(field torch_lib)}:$(field nvidia_libs):${LD_LIBRARY_PATH:-}"
glibc="$(ldd --version 2>/dev/null | head -n 1 | grep -o '[0-9.]*$')"
gpu="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
hicra="$bin/hicra"
[ -x "$hicra" ] || hicra=target/release/hicra
if ! version="$("$hicra" --version 2>&1)"; then
  record "environment" FAIL "$hicra does not run: $version"
fi
record "environment" "$([ -n "$env_json" ] && [ -n "$gpu" ] && echo ok || echo degraded)" \
  "GPU ${gpu:-none}; torch ${torch_version:-none} (CUDA $(field cuda)), transformers $(field transformers), PEFT $(field peft), openai $(field openai); glibc $glibc"

# 1. Parity with transformers on the same GPU, f32 and bf16.
parity="$bin/parity"
for dtype in f32 bf16; do
  refs="$out/parity-$dtype"
  if [ ! -x "$parity" ]; then record "parity $device $dtype" skip "no parity binary (run --prepare here and carry $bin)"; continue; fi
  if ! timeout "$(budget 60)" "$py" scripts/gpu_parity_reference.py --device "$device" --dtype "$dtype" --out "$refs" > "$out/parity-$dtype-reference.log" 2>&1; then
    record "parity $device $dtype" FAIL "transformers reference failed: $(tail -n 1 "$out/parity-$dtype-reference.log")"; continue
  fi
  if HICRA_TEST_DEVICE="$device" HICRA_TEST_DTYPE="$dtype" HICRA_PARITY_REFERENCE_DIR="$refs" timeout "$(budget 60)" "$parity" --test-threads 1 --nocapture > "$out/parity-$dtype.log" 2>&1; then
    result=ok
  else
    result=FAIL
  fi
  worst="$(grep -o 'transformers| = [0-9.e+-]*' "$out/parity-$dtype.log" | awk '{print $3}' | sort -g | tail -n 1)"
  detail="$(grep -c 'max |logprob' "$out/parity-$dtype.log") models, worst max |logprob - transformers| = ${worst:-?} ($(grep -c skipped "$out/parity-$dtype.log") skipped)"
  if [ "$dtype" = bf16 ]; then  # bf16 is judged by its distance to f32, next to transformers' own
    detail="$detail; worst bf16 error vs f32: hicra $(grep -o 'hicra [0-9.e+-]*' "$out/parity-$dtype.log" | awk '{print $2}' | sort -g | tail -n 1), transformers $(grep -o 'transformers [0-9.e+-]*$' "$out/parity-$dtype.log" | awk '{print $2}' | sort -g | tail -n 1)"
  fi
  record "parity $device $dtype" "$result" "$detail"
done

# 2-3. Serving and one online step, through the openai client.
if timeout "$(budget 90)" "$py" scripts/gpu_serve_check.py --hicra "$hicra" --device "$device" > "$out/serve.jsonl" 2> "$out/serve.log"; then :; fi
while read -r line; do
  [ -n "$line" ] || continue
  name="$(echo "$line" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["check"])')"
  ok="$(echo "$line" | "$py" -c 'import json,sys; print("ok" if json.load(sys.stdin)["ok"] else "FAIL")')"
  record "$name" "$ok" "$(echo "$line" | "$py" -c 'import json,sys; d=json.load(sys.stdin); [d.pop(k, None) for k in ("check", "ok")]; print(", ".join(f"{k} {v}" for k, v in d.items()))')"
done < "$out/serve.jsonl"
[ -s "$out/serve.jsonl" ] || record "serve checks" FAIL "$(tail -n 2 "$out/serve.log" | tr '\n' ' ')"

# 4. Benchmarks, side by side on the same GPU: decode and prefill, then the training step.
peak_gpu_mib() {  # runs "$@", sampling the GPU memory the process tree uses; prints the peak
  "$@" & local pid=$! peak=0
  while kill -0 "$pid" 2>/dev/null; do
    local used
    used="$(nvidia-smi --query-compute-apps=used_memory --format=csv,noheader,nounits 2>/dev/null | awk '{s+=$1} END {print s+0}')"
    [ "${used:-0}" -gt "$peak" ] && peak="$used"
    sleep 0.2
  done
  wait "$pid"; local rc=$?
  echo "$peak" > "$out/peak-gpu-mib"
  return $rc
}
if [ -n "${HICRA_GPU_SKIP_BENCH:-}" ]; then
  record "benchmarks" skip "HICRA_GPU_SKIP_BENCH is set"
  printf '%s\n' "${rows[@]}"
  exit 0
fi
timeout "$(budget 60)" "$hicra" bench --device cuda --dtype bf16 --shape "$shape" --batch 1,16,64 --json > "$out/bench-hicra.jsonl" 2> "$out/bench-hicra.log"
# Constrained decoding: the same decode free and under a JSON grammar (masks computed on the
# host while the GPU runs the forward pass, applied on the device).
if [ -f "$bin/tokenizer/tokenizer.json" ]; then
  timeout "$(budget 35)" "$hicra" bench --device cuda --dtype bf16 --shape "$shape" --tokenizer "$bin/tokenizer/tokenizer.json" \
    --batch 1,16,64 --prompt-tokens 64 --decode-tokens 64 --repeats 2 --constrained --json > "$out/bench-constrained.jsonl" 2> "$out/bench-constrained.log"
fi
timeout "$(budget 90)" "$py" scripts/bench_reference.py --only transformers --shape "$shape" --device cuda --dtype bf16 --batch 1,16,64 --wait-idle 0 \
  > "$out/bench-transformers.jsonl" 2> "$out/bench-transformers.log"
train_args=(--shape "$shape" --batch 8 --prompt-tokens 512 --completion-tokens 512 --micro-batch 8 --steps 3)
peak_gpu_mib timeout "$(budget 45)" "$hicra" bench-train --device cuda --dtype bf16 "${train_args[@]}" > "$out/train-hicra.jsonl" 2> "$out/train-hicra.log"
hicra_train_mib="$(cat "$out/peak-gpu-mib" 2>/dev/null)"
peak_gpu_mib timeout "$(budget 45)" "$hicra" bench-train --device cuda --dtype bf16 "${train_args[@]}" --activation-checkpointing > "$out/train-hicra-checkpointed.jsonl" 2> "$out/train-hicra-checkpointed.log"
checkpointed_train_mib="$(cat "$out/peak-gpu-mib" 2>/dev/null)"
peak_gpu_mib timeout "$(budget 75)" "$py" scripts/bench_train_reference.py --device cuda --dtype bf16 "${train_args[@]}" > "$out/train-transformers.jsonl" 2> "$out/train-transformers.log"
reference_train_mib="$(cat "$out/peak-gpu-mib" 2>/dev/null)"

table="$("$py" scripts/gpu_check_table.py "$out" "$shape" "${hicra_train_mib:-0}" "${checkpointed_train_mib:-0}" "${reference_train_mib:-0}")"

echo
echo "## gpu-check $(date -u +%Y-%m-%d), ${gpu:-no GPU}"
echo
echo "| check | result | detail |"
echo "|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "$table"
