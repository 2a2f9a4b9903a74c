"""Start a server subprocess on loopback: the one launcher of the tests and the benchmarks.

:class:`ServerProcess` starts a command (``vllm serve`` or a compared system's own server) in its
own process group with its output in a log file, waits until its health URL answers 200 or the
process exits, and stops the whole group. :func:`run_until_exit` starts a command that is expected
to fail at startup and returns its exit code and output (or reports a hang).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


class StartError(RuntimeError):
    """The server did not become healthy; the message carries the reason and its log tail."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_serve_command(model: Path | str, port: int, args: list[str]) -> list[str]:
    """``vllm serve MODEL`` on ``127.0.0.1:port`` with ``args``, run by this Python."""
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model),
            "--host", "127.0.0.1", "--port", str(port), *args]


class ServerProcess:
    """A server subprocess listening on ``base`` (``http://127.0.0.1:port``).

    ``env`` is added to (and overrides) the inherited environment. ``start`` waits for
    ``health_path`` to answer 200 and raises :class:`StartError` if the process exits, a
    ``fatal_log_markers`` line appears in its log, or the timeout passes.
    """

    def __init__(self, command: list[str], port: int, log_path: Path, env: dict[str, str] | None = None,
                 health_path: str = "/health", fatal_log_markers: tuple[str, ...] = (),
                 error_tail_lines: int = 60):
        self.command = command
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.env = env or {}
        self.health_path = health_path
        self.fatal_log_markers = fatal_log_markers
        self.error_tail_lines = error_tail_lines
        self.proc: subprocess.Popen | None = None
        self.startup_s = float("nan")

    def start(self, timeout: float) -> None:
        """Start the process and wait until it is healthy; ``startup_s`` is how long that took."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env}, start_new_session=True)
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StartError(f"exited with code {self.proc.returncode} during startup\n"
                                 f"{self.log_tail(self.error_tail_lines)}")
            if self._log_has_fatal_marker():
                self.stop()
                raise StartError(f"failed during startup\n{self.log_tail(self.error_tail_lines)}")
            try:
                if httpx.get(self.base + self.health_path, timeout=5).status_code == 200:
                    self.startup_s = time.monotonic() - t0
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise StartError(f"not healthy after {timeout:.0f} s\n{self.log_tail(self.error_tail_lines)}")

    def _log_has_fatal_marker(self) -> bool:
        if not self.fatal_log_markers or not self.log_path.exists():
            return False
        text = self.log_path.read_text(errors="replace")
        return any(m in text for m in self.fatal_log_markers)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, n: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-n:])


@dataclass
class Exit:
    """How a process started by :func:`run_until_exit` ended."""

    returncode: int | None  # None: still running at the timeout (a hang), then killed
    output: str  # stdout and stderr together
    seconds: float

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


def run_until_exit(command: list[str], log_path: Path, env: dict[str, str] | None = None,
                   timeout: float = 300) -> Exit:
    """Run ``command`` (its output also kept in ``log_path``) until it exits or ``timeout`` passes.

    For servers expected to refuse to start: a process still running at the timeout is a hang;
    its process group is killed and ``returncode`` is None.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        returncode: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        returncode = None
    return Exit(returncode, log_path.read_text(errors="replace"), time.monotonic() - start)
