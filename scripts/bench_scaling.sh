#!/usr/bin/env bash
# Data-parallel scaling on this machine: one training step (`hicra bench-train`) with the batch
# split over 1 and 2 replicas (`--nproc`, Gloo over loopback), the share of the step spent in
# collectives, and the gradient all-reduce alone. Then, on paper, the same all-reduce for 8 GPUs
# of real model shapes over NVLink and over 100 Gb/s Ethernet. Prints markdown.
#
#   scripts/bench_scaling.sh          # default model, 8 x (64 + 64) tokens, LoRA r=16
#
# Knobs: BENCH_BATCH (8), BENCH_PROMPT_TOKENS (64), BENCH_COMPLETION_TOKENS (64), BENCH_RANK (16),
# BENCH_STEPS (3), BENCH_WORLD_SIZES ("1 2").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh >&2
cargo build --release -p hicra-core >&2
args=(--device cpu --batch "${BENCH_BATCH:-8}" --prompt-tokens "${BENCH_PROMPT_TOKENS:-64}"
      --completion-tokens "${BENCH_COMPLETION_TOKENS:-64}" --rank "${BENCH_RANK:-16}" --steps "${BENCH_STEPS:-3}")
mkdir -p target/bench
out=target/bench/scaling.jsonl
: > "$out"
for n in ${BENCH_WORLD_SIZES:-1 2}; do
  echo "[bench-scaling] world size $n" >&2
  target/release/hicra bench-train "${args[@]}" --nproc "$n" 2>/dev/null | grep '^{' | tail -n 1 >> "$out"
done
.deps/venv/bin/python - "$out" "$(nproc)" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
cores = sys.argv[2]
r0 = rows[0]
grad_bytes = r0["adapter_values"] * 4
print(f"Training step, smollm2-135m-instruct, B={r0['batch']} x ({r0['prompt_tokens']} prompt + {r0['completion_tokens']} completion) tokens "
      f"split over the replicas, LoRA r={r0['rank']} on all seven projections ({r0['adapter_values']:,} values, "
      f"{grad_bytes / 1e6:.1f} MB of f32 gradients), f32, {cores} CPU cores shared by the replicas, Gloo over loopback:")
print()
print("| replicas | step s | vs 1 replica | in collectives (share of step) | gradient all-reduce alone |")
print("|---:|---:|---:|---:|---:|")
base = rows[0]["step_seconds"]
for r in rows:
    share = r["collective_seconds"] / r["step_seconds"]
    alone = f"{r['gradient_allreduce_seconds'] * 1e3:.1f} ms ({grad_bytes / r['gradient_allreduce_seconds'] / 1e9:.2f} GB/s)" if r["gradient_allreduce_seconds"] else "-"
    print(f"| {r['world_size']} | {r['step_seconds']:.2f} | x{base / r['step_seconds']:.2f} | {r['collective_seconds'] * 1e3:.1f} ms ({100 * share:.1f}%) | {alone} |")
print()

# On paper: ring all-reduce of the LoRA gradients over 8 GPUs. Each GPU sends and receives
# 2 (N-1)/N of the buffer; each of the 2 (N-1) hops also pays a latency.
shapes = {  # hidden, intermediate, layers, attention heads, kv heads, head dim (published configs)
    "Qwen2.5-0.5B": (896, 4864, 24, 14, 2, 64),
    "Qwen2.5-1.5B": (1536, 8960, 28, 12, 2, 128),
    "Qwen2.5-7B": (3584, 18944, 28, 28, 4, 128),
    "Llama-3.1-8B": (4096, 14336, 32, 32, 8, 128),
}
links = [  # name, bus bandwidth assumed (bytes/s), per-hop latency (s)
    ("NVLink 4 (H100 SXM), NCCL", 300e9, 10e-6),
    ("8 nodes x 1 GPU, 100 Gb/s Ethernet", 10e9, 30e-6),
]
rank, world = r0["rank"], 8
print(f"Projection for {world} GPUs, LoRA r={rank} on all seven projections, f32 gradients (ring all-reduce: "
      f"2 (N-1)/N x bytes / bus bandwidth + 2 (N-1) x latency):")
print()
print("| model | LoRA values | gradient MB | " + " | ".join(name for name, _, _ in links) + " |")
print("|---|---:|---:|" + "---:|" * len(links))
for model, (h, inter, layers, heads, kv, d) in shapes.items():
    q, kvw = heads * d, kv * d
    per_layer = rank * ((h + q) + 2 * (h + kvw) + (q + h) + 2 * (h + inter) + (inter + h))
    values = per_layer * layers
    size = values * 4
    cells = []
    for _, bandwidth, latency in links:
        t = 2 * (world - 1) / world * size / bandwidth + 2 * (world - 1) * latency
        cells.append(f"{t * 1e3:.2f} ms")
    print(f"| {model} | {values / 1e6:.1f} M | {size / 1e6:.0f} | " + " | ".join(cells) + " |")
print()
print("Assumed: NCCL bus bandwidth 300 GB/s on NVLink 4 (nccl-tests report 350-480 GB/s for GB-sized "
      "messages on 8 x H100; tens of MB get less), 10 GB/s of a 100 Gb/s link (80% of line rate), "
      "10 and 30 us per hop. Not measured: no GPU has run these.")
PY
