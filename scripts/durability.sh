#!/usr/bin/env bash
# The crash test's figures for the README: runs the SIGKILL suite (tests/durability.rs) once
# and prints its numbers as a Markdown table. HICRA_CRASH_SEED=N repeats a kill schedule.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
report="$(mktemp)"
HICRA_DURABILITY_REPORT="$report" cargo test --release -p hicra-core --test durability sigkill -- --nocapture >&2
python3 - "$report" <<'PY'
import json, sys
f = json.load(open(sys.argv[1]))
print("| kills (decoding / after rewards / mid-checkpoint) | restarts | rewarded groups | groups recovered at start | of them retrained (update lost) | lost steps | logprob checks (max gap <= 1e-6) | worst recovery |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
print(f"| {f['kills']} ({f['kills_while_decoding']} / {f['kills_after_rewards']} / {f['kills_while_checkpointing']}) | {f['restarts']} | "
      f"{f['groups_acknowledged']} | {f['groups_recovered']} | {f['groups_retrained']} | {f['lost_steps']} | {f['logprob_checks']} | {f['worst_recovery_s']:.2f} s |")
print(f"\nseed {f['seed']}")
PY
rm -f "$report"
