"""Fixtures for the end-to-end tests of `hicra serve` through the official OpenAI client.

One server process serves the whole session: starting it loads a model, which is the slow part
on a CPU. It runs on a free local port with a fixed API key and a small context window
(`--max-context 256`), so a too-long prompt is cheap to produce.

Environment:
    HICRA_BIN         the hicra binary (default: <repo>/target/release/hicra)
    HICRA_SERVE_ARGS  extra arguments for `hicra serve`, split like a shell line
                      (for example "--model path/to/model.gguf")
    HICRA_MODEL_ID    the model id the server reports (default: smollm2-135m-instruct)

Install the client with `.deps/venv/bin/python -m pip install -r tests/python/requirements.txt`
and run `.deps/venv/bin/python -m pytest tests/python`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key"
MAX_CONTEXT = 256
STARTUP_TIMEOUT_S = 120.0
DEFAULT_MODEL_ID = "smollm2-135m-instruct"

# The server's stderr log, kept so a failing session can show its tail in the summary.
_server_log: Path | None = None


def _listening_url(log: Path) -> str | None:
    """The address the server printed once bound (`listening on http://...`), if it has."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("listening on "):
            return line.removeprefix("listening on ").strip()
    return None


def _log_tail(path: Path | None, lines: int = 40) -> str:
    if path is None or not path.exists():
        return "<no server log>"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


@pytest.fixture(scope="session")
def api_key() -> str:
    return API_KEY


@pytest.fixture(scope="session")
def max_context() -> int:
    return MAX_CONTEXT


@pytest.fixture(scope="session")
def model_id() -> str:
    return os.environ.get("HICRA_MODEL_ID", DEFAULT_MODEL_ID)


@contextlib.contextmanager
def start_hicra(args: list[str]) -> Iterator[str]:
    """Starts `hicra serve --device cpu --host 127.0.0.1 --port 0 ARGS`, waits for /health,
    yields the URL it listens on, and stops the server."""
    global _server_log
    binary = Path(os.environ.get("HICRA_BIN", REPO / "target" / "release" / "hicra"))
    if not binary.is_file():
        pytest.fail(f"{binary} not found: run `cargo build --release` or set HICRA_BIN")
    # Port 0: the server binds a free port itself and prints it (a port picked here and
    # closed again could be taken before the server binds it).
    cmd = [str(binary), "serve", "--device", "cpu", "--host", "127.0.0.1", "--port", "0", *args]
    fd, log_name = tempfile.mkstemp(prefix="hicra-serve-", suffix=".log")
    os.close(fd)
    _server_log = Path(log_name)
    with open(_server_log, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        url = None
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"`{shlex.join(cmd)}` exited with {proc.returncode} before it was ready:\n"
                    + _log_tail(_server_log)
                )
            url = url or _listening_url(_server_log)
            try:
                if url and httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"server not healthy after {STARTUP_TIMEOUT_S:.0f} s:\n" + _log_tail(_server_log)
                )
            time.sleep(0.25)
        yield url
    finally:
        _stop(proc)


@contextlib.contextmanager
def start_training_hicra(extra: list[str]) -> Iterator[str]:
    """`start_hicra` with training on: a small LoRA (rank 4, lr 1e-3), stale rollouts kept,
    the state folder in a fresh temporary directory (never the repository's ./hicra-state)."""
    folder = Path(tempfile.mkdtemp(prefix="hicra-train-"))
    (folder / "trainer.toml").write_text("[optim]\nlr = 1e-3\n[lora]\nrank = 4\n")
    args = ["--max-context", str(MAX_CONTEXT), "--train-config", str(folder / "trainer.toml"), "--state-dir", str(folder / "state"), "--max-staleness", "none", *extra]
    with start_hicra(args) as url:
        yield url


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """The session's server: the default model, a fixed API key, a small context."""
    args = ["--api-key", API_KEY, "--max-context", str(MAX_CONTEXT), *shlex.split(os.environ.get("HICRA_SERVE_ARGS", ""))]
    with start_hicra(args) as url:
        yield url


@pytest.fixture(scope="session")
def client(server_url: str) -> Iterator[openai.OpenAI]:
    """The official client, without retries (a retry would hide a failure or a 5xx)."""
    with openai.OpenAI(
        base_url=f"{server_url}/v1", api_key=API_KEY, max_retries=0, timeout=120
    ) as c:
        yield c


@pytest.fixture(scope="session")
def http(server_url: str) -> Iterator[httpx.Client]:
    """A raw HTTP client (with the API key) for what the OpenAI client cannot send."""
    with httpx.Client(
        base_url=server_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
    ) as c:
        yield c


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    """On failure, shows what the server printed last."""
    if exitstatus != 0 and _server_log is not None:
        terminalreporter.section("hicra serve: last lines of its log")
        terminalreporter.write_line(_log_tail(_server_log, 60))
