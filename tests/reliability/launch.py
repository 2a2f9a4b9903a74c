"""Start ``vllm serve`` expecting it to fail: the exit code and output, or a hang reported as such."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import _free_port

HANG_TIMEOUT = 300  # a hang detector (generous: CI boxes are shared), not a speed requirement


@dataclass
class Run:
    returncode: int | None  # None: still running at the timeout (a hang)
    output: str
    seconds: float

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


def serve_expecting_failure(model: Path | str, args: list[str], env: dict[str, str] | None = None,
                            timeout: float = HANG_TIMEOUT) -> Run:
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model), "--host", "127.0.0.1",
           "--port", str(_free_port()), *args]
    full_env = {**os.environ, "VLLM_MLX_DEVICE": os.environ.get("VLLM_MLX_DEVICE", "cpu"), **(env or {})}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=full_env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return Run(proc.returncode, out, time.monotonic() - start)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return Run(None, out, time.monotonic() - start)
