#!/usr/bin/env bash
# Side-by-side benchmark: hicra vs the engines a user would otherwise pick, same model, same
# machine, same workload, in one run.
#   hicra          target/release/hicra bench ... --json
#   transformers   Hugging Face generate on the same libtorch (PyPI torch 2.11 wheel)
#   llama.cpp      llama-cpp-python (CPU), on an F32 copy of the GGUF and on the original file
# Workload: B identical prompts of exactly PROMPT_TOKENS tokens, greedy, eos disabled, every
# sequence produces exactly DECODE_TOKENS tokens; prefill = batched forward over the prompts +
# first token, decode = the remaining steps (see scripts/bench_reference.py for the exact split).
#
# Usage: scripts/bench.sh            (CPU, f32, batches 1,8,32, 128 prompt / 64 decode tokens)
# Environment knobs:
#   BENCH_DEVICE=cpu|cuda  BENCH_DTYPE=f32|bf16 (default f32 on cpu, bf16 on cuda)
#   BENCH_BATCH=1,8,32  BENCH_PROMPT_TOKENS=128  BENCH_DECODE_TOKENS=64
#   BENCH_REPEATS=2        measured runs per reference row (fastest kept)
#   BENCH_WAIT_IDLE=60     references wait up to this many s for idle CPUs before each run
#   BENCH_TRANSFORMERS_BATCH=...  batch sizes for transformers (default: BENCH_BATCH)
#   BENCH_ENGINES="hicra transformers llamacpp"   subset to run
#   BENCH_MODEL=path.gguf  (default .deps/models/smollm2-135m-instruct.gguf)
#   BENCH_SKIP_BUILD=1     use the existing target/release/hicra
# Output: a markdown table on stdout; raw JSON lines in target/bench/results.jsonl.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { printf '[bench] %s\n' "$*" >&2; }

device="${BENCH_DEVICE:-cpu}"
if [ "$device" = cuda ]; then dtype="${BENCH_DTYPE:-bf16}"; else dtype="${BENCH_DTYPE:-f32}"; fi
batch="${BENCH_BATCH:-1,8,32}"
ptok="${BENCH_PROMPT_TOKENS:-128}"
dtok="${BENCH_DECODE_TOKENS:-64}"
repeats="${BENCH_REPEATS:-2}"
wait_idle="${BENCH_WAIT_IDLE:-60}"
tbatch="${BENCH_TRANSFORMERS_BATCH:-$batch}"
engines=" ${BENCH_ENGINES:-hicra transformers llamacpp} "
model="${BENCH_MODEL:-$root/.deps/models/smollm2-135m-instruct.gguf}"
py="$root/.deps/venv/bin/python"

scripts/setup.sh >&2

scripts/install_bench_references.sh

out="$root/target/bench"
mkdir -p "$out"
results="$out/results.jsonl"
: > "$results"

if [[ "$engines" == *" hicra "* ]]; then
  if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
    say "cargo build --release -p hicra-core"
    cargo build --release -p hicra-core >&2
  fi
  hicra_args=(bench --device "$device" --batch "$batch" --prompt-tokens "$ptok" --decode-tokens "$dtok" --max-context "$((ptok + dtok + 1))" --json)
  # --dtype only when asked for or on cuda (f32 is hicra's CPU default); --model only when not the default.
  if [ -n "${BENCH_DTYPE:-}" ] || [ "$device" != cpu ]; then hicra_args+=(--dtype "$dtype"); fi
  if [ -n "${BENCH_MODEL:-}" ]; then hicra_args+=(--model "$model"); fi
  say "hicra ${hicra_args[*]}"
  # Keep only the JSON lines; tag them with the engine name if hicra does not. A failing hicra
  # is reported and the references still run.
  { target/release/hicra "${hicra_args[@]}" || say "warning: hicra bench failed (exit $?)"; } \
    | "$py" -c '
import json, sys
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("{"):
        print(line, file=sys.stderr); continue
    row = json.loads(line)
    row.setdefault("engine", "hicra")
    row.setdefault("dtype", sys.argv[1])
    row.setdefault("device", sys.argv[2])
    print(json.dumps(row), flush=True)
' "$dtype" "$device" >> "$results"
fi

ref_args=(--model-gguf "$model" --batch "$batch" --prompt-tokens "$ptok" --decode-tokens "$dtok"
          --device "$device" --dtype "$dtype" --repeats "$repeats" --transformers-batch "$tbatch"
          --wait-idle "$wait_idle")
for eng in transformers llamacpp; do
  if [[ "$engines" == *" $eng "* ]]; then
    say "reference: $eng"
    "$py" scripts/bench_reference.py "${ref_args[@]}" --only "$eng" >> "$results"
  fi
done

say "raw results: $results"
"$py" - "$results" "$batch" "$(basename "$model")" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
batches = [int(b) for b in sys.argv[2].split(",") if b]
engines = list(dict.fromkeys(r["engine"] for r in rows))
by = {(r["engine"], r["batch"]): r for r in rows}
if rows:
    r0 = rows[0]
    print(f"Model {sys.argv[3]}; {r0['prompt_tokens']} prompt tokens, "
          f"{r0['decode_tokens']} decode tokens, device {next((r['device'] for r in rows if 'device' in r), '?')}, "
          f"threads {sorted({r.get('threads') for r in rows if r.get('threads')})}.\n")
for key, title in (("prefill_tokens_per_s", "Prefill tokens/s"), ("decode_tokens_per_s", "Decode tokens/s")):
    print(f"### {title} (higher is better; x = hicra / engine)\n")
    print("| engine | dtype | " + " | ".join(f"B={b}" for b in batches) + " |")
    print("|---|---|" + "---:|" * len(batches))
    for e in engines:
        cells, dt = [], ""
        for b in batches:
            r = by.get((e, b))
            if r is None or r.get(key) is None:
                cells.append("-")
                continue
            dt = dt or str(r.get("dtype", ""))
            v = r[key]
            h = by.get(("hicra", b), {}).get(key)
            if e != "hicra" and h:
                cells.append(f"{v:.1f} (x{h / v:.2f})")
            else:
                cells.append(f"{v:.1f}")
        print(f"| {e} | {dt} | " + " | ".join(cells) + " |")
    print()
floor = next((r for r in rows if r["engine"] == "hicra" and r.get("bandwidth_floor_ms")), None)
if floor:
    print(f"### hicra decode step vs the bandwidth floor ({floor['read_bandwidth_gb_s']:.1f} GB/s measured read bandwidth: "
          f"{floor['bandwidth_floor_ms']:.1f} ms to read the weights once)\n")
    print("| | " + " | ".join(f"B={b}" for b in batches) + " |")
    print("|---|" + "---:|" * len(batches))
    cells = [by.get(("hicra", b), {}).get("decode_ms_per_step") for b in batches]
    print("| ms/step | " + " | ".join("-" if c is None else f"{c:.1f} (x{c / floor['bandwidth_floor_ms']:.2f} floor)" for c in cells) + " |")
    print()
drift = next((r for r in rows if r["engine"] == "hicra" and r.get("logprob_drift_mean") is not None), None)
if drift:
    print(f"hicra {drift['dtype']} against the same weights in f32 (teacher-forced log-probabilities on varied prose): "
          f"mean |difference| {drift['logprob_drift_mean']:.2e}, largest {drift['logprob_drift_max']:.2e}, "
          f"same most likely token at {100 * drift['argmax_agreement']:.1f}% of positions.")
    print()
EOF
