"""torchrun starts hicra replicas unchanged: `torchrun --nproc-per-node 2 --no-python hicra train`.

torchrun's agent serves the rendezvous store itself (TORCHELASTIC_USE_AGENT_STORE), so the
replicas must join it rather than serve their own. Two steps on the tiny fixture model: both
ranks log the same adapter hash after each step, and the held-out evaluation (split across
the ranks) is reported by both.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HICRA = os.environ.get("HICRA_BIN", str(REPO / "target" / "release" / "hicra"))
TINY_MODEL = REPO / "core" / "tests" / "fixtures" / "parity" / "llama" / "model.gguf"


def _run_config(out: Path) -> str:
    """The shared tiny run (tests/fixtures/tiny-run.toml) for two steps."""
    template = (REPO / "tests" / "fixtures" / "tiny-run.toml").read_text()
    return template.replace("MODEL", str(TINY_MODEL)).replace("STEPS", "2").replace("OUTPUT_DIR", str(out))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_starts_replicas_that_train_one_adapter(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(_run_config(tmp_path / "out"))
    port = str(_free_port())
    # torch's own launcher; the CUDA libraries its wheel links are stubbed on a CPU machine.
    launcher = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO / "scripts")!r})
        from torch_stubs import ensure_torch_importable
        ensure_torch_importable()
        from torch.distributed.run import main
        sys.argv = ["torchrun", "--nproc-per-node", "2", "--master-port", {port!r}, "--no-python",
                    {HICRA!r}, "train", "--device", "cpu", "--config", {str(config)!r}]
        main()
        """
    )
    done = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    rank0 = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    rank1 = [json.loads(line) for line in (tmp_path / "out" / "rank-1" / "metrics.jsonl").read_text().splitlines()]
    assert len(rank0) == len(rank1) == 2
    for step0, step1 in zip(rank0, rank1):
        assert step0["updated"] and step0["adapter_hash"] != 0
        assert step0["adapter_hash"] == step1["adapter_hash"], (step0, step1)
    assert rank0[-1]["eval_pass1"] == rank1[-1]["eval_pass1"]
