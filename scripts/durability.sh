#!/usr/bin/env bash
# The crash test's figures for the README: runs the SIGKILL test (tests/durability.rs) on the
# tiny test model (as CI does) and on the default model (SmolLM2-135M-Instruct, for a realistic
# recovery time), and prints one Markdown row each. HICRA_CRASH_SEED=N repeats a kill schedule.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tiny="$(mktemp)"; default="$(mktemp)"
trap 'rm -f "$tiny" "$default"' EXIT
HICRA_DURABILITY_REPORT="$tiny" cargo test --release -p hicra-core --test durability sigkill -- --nocapture >&2
HICRA_CRASH_MODEL=smollm2-135m-instruct HICRA_DURABILITY_REPORT="$default" \
  cargo test --release -p hicra-core --test durability sigkill -- --nocapture >&2
python3 - "$tiny" "$default" <<'PY'
import json, sys
print("| model | kills (decoding / after rewards / mid-checkpoint) | restarts | rewarded groups | groups recovered (summed over restarts) | of them retrained (update lost) | lost steps | logprob checks (gap <= 1e-6) | worst recovery |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for path in sys.argv[1:]:
    f = json.load(open(path))
    print(f"| {f['model']} | {f['kills']} ({f['kills_while_decoding']} / {f['kills_after_rewards']} / {f['kills_while_checkpointing']}) | {f['restarts']} | "
          f"{f['groups_acknowledged']} | {f['groups_recovered']} | {f['groups_retrained']} | {f['lost_steps']} | {f['logprob_checks']} | {f['worst_recovery_s']:.2f} s |")
print("\nseeds " + ", ".join(str(json.load(open(p))["seed"]) for p in sys.argv[1:]))
PY
