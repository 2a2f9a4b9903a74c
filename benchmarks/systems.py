"""The compared systems, each a real OpenAI-compatible server started on loopback and stopped.

One small class per system says how to start it (command line, environment), where its health
URL is, what model id requests carry, and why it cannot run here (``unavailable()``); starting and
stopping is :class:`benchmarks.server.ServerProcess`. A server that fails to start raises
:class:`benchmarks.server.StartError` with the reason and the tail of its log, which the report
shows instead of dropping the system.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.server import ServerProcess, free_port, vllm_serve_command

SERVED_NAME = "smollm2"
LOG_TAIL_LINES = 25  # of a server's log in a start error and the report


@dataclass(frozen=True)
class Setup:
    """What every system is configured from: checkpoints, device, sizes."""

    hf: Path
    mlx: Path
    gguf: Path | None
    device: str  # "cpu" or "gpu"
    max_model_len: int
    max_num_seqs: int
    kv_cache_gib: float
    log_dir: Path


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


class Server:
    """Base class: one system's server; subclasses give the command line and environment."""

    name = ""
    checkpoint_kind = ""  # which of Setup's checkpoints it serves, for the report
    health_path = "/health"
    fatal_log_markers: tuple[str, ...] = ()  # a log line that means it will never become healthy

    def __init__(self, setup: Setup):
        self.setup = setup
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process: ServerProcess | None = None
        self.log_path = setup.log_dir / f"{self.name}-{self.port}.log"
        self.startup_s = float("nan")

    # -- what subclasses describe -------------------------------------------------------------
    def unavailable(self) -> str | None:
        """Why this system cannot run here (missing package or checkpoint), or None."""
        return None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        """Variables added to (and overriding) the inherited environment."""
        return {}

    @property
    def model_id(self) -> str:
        """The ``model`` field requests carry."""
        return SERVED_NAME

    def checkpoint(self) -> str:
        return str(self.setup.hf)

    def fmt(self) -> str:
        """Weight format and compute dtype, for the report."""
        return ""

    def version(self) -> str:
        return ""

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout: float) -> None:
        """Start the server and wait for its health URL; raise ``StartError`` if it fails."""
        env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **self.env()}
        self.process = ServerProcess(self.command(), self.port, self.log_path, env=env,
                                     health_path=self.health_path, fatal_log_markers=self.fatal_log_markers,
                                     error_tail_lines=LOG_TAIL_LINES)
        self.process.start(timeout)
        self.startup_s = self.process.startup_s

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.process.proc if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL after 30 s."""
        if self.process is not None:
            self.process.stop()

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        return self.process.log_tail(n) if self.process else ""


class _VllmServe(Server):
    """``vllm serve`` on the HF checkpoint, same flags for the plugin and vLLM's CPU backend."""

    def command(self) -> list[str]:
        s = self.setup
        return vllm_serve_command(s.hf, self.port, [
            "--served-model-name", SERVED_NAME, "--dtype", "float32", "--max-model-len", str(s.max_model_len),
            "--max-num-seqs", str(s.max_num_seqs), "--seed", "0", *self.extra_args()])

    def extra_args(self) -> list[str]:
        return []

    def fmt(self) -> str:
        return "safetensors fp32, computed in fp32"

    def version(self) -> str:
        return f"vllm {_version('vllm')}"


class VllmMetal(_VllmServe):
    """This plugin: vLLM's engine and server, the model in MLX on ``VLLM_MLX_DEVICE``."""

    name = "vllm-metal"

    def extra_args(self) -> list[str]:
        return ["--kv-cache-memory-bytes", str(int(self.setup.kv_cache_gib * 2**30))]

    def env(self) -> dict[str, str]:
        return {"VLLM_MLX_DEVICE": self.setup.device}

    def version(self) -> str:
        return f"vllm-metal {_version('vllm-metal')}, vllm {_version('vllm')}, mlx {_version('mlx')}"


class VllmCpu(_VllmServe):
    """vLLM's built-in CPU backend from the same install, with this plugin disabled."""

    name = "vllm-cpu"

    def unavailable(self) -> str | None:
        if sys.platform == "darwin":
            return "vLLM's CPU backend is not in this macOS install"
        return None

    def env(self) -> dict[str, str]:
        # VLLM_CPU_KVCACHE_SPACE is the CPU backend's KV budget in GiB (integer); thread binding
        # stays vLLM's default unless the caller's environment sets VLLM_CPU_OMP_THREADS_BIND.
        return {"VLLM_PLUGINS": "none", "VLLM_TARGET_DEVICE": "cpu",
                "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(self.setup.kv_cache_gib)))}


class MlxLm(Server):
    """mlx-lm's own server (continuous batching) on the MLX checkpoint of the same weights."""

    name = "mlx-lm"
    # The model loads in a thread; if that fails, /health answers 503 forever.
    fatal_log_markers = ("generation thread died",)

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("mlx_lm") is None:
            return "not installed: pip install mlx-lm"
        return None

    def command(self) -> list[str]:
        args = ["--model", str(self.setup.mlx), "--host", "127.0.0.1", "--port", str(self.port),
                "--decode-concurrency", str(self.setup.max_num_seqs), "--log-level", "WARNING"]
        if self.setup.device == "cpu" and _mlx_has_gpu():
            # mlx_lm's server has no device flag; run it with MLX's default device set to the CPU.
            launch = ("import sys, mlx.core as mx; from mlx_lm.server import main; "
                      "mx.set_default_device(mx.cpu); sys.argv[0] = 'mlx_lm.server'; main()")
            return [sys.executable, "-c", launch, *args]
        return [sys.executable, "-m", "mlx_lm", "server", *args]

    @property
    def model_id(self) -> str:
        return str(self.setup.mlx)  # mlx_lm.server serves the model named in the request

    def checkpoint(self) -> str:
        return str(self.setup.mlx)

    def fmt(self) -> str:
        return "MLX safetensors fp32"

    def version(self) -> str:
        return f"mlx-lm {_version('mlx-lm')}, mlx {_version('mlx')}"


class LlamaCpp(Server):
    """llama.cpp through llama-cpp-python's server, on the GGUF the bundled model came from."""

    name = "llama.cpp"
    health_path = "/v1/models"  # the Python server has no /health

    def unavailable(self) -> str | None:
        if self.setup.gguf is None or not self.setup.gguf.exists():
            return f"no GGUF checkpoint ({self.setup.gguf})"
        for mod in ("llama_cpp", "starlette_context", "sse_starlette", "pydantic_settings"):
            if importlib.util.find_spec(mod) is None:
                return f"not installed: pip install 'llama-cpp-python[server]' (no module {mod})"
        return None

    def command(self) -> list[str]:
        threads = str(os.cpu_count() or 1)  # its default is half the cores; the others use all
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(self.setup.gguf),
                "--model_alias", SERVED_NAME, "--host", "127.0.0.1", "--port", str(self.port),
                "--n_ctx", str(self.setup.max_model_len), "--n_threads", threads,
                "--n_threads_batch", threads, "--verbose", "False",
                # default True: a new request aborts the running one; queue them instead
                "--interrupt_requests", "False",
                "--n_gpu_layers", "-1" if self.setup.device == "gpu" else "0"]

    def checkpoint(self) -> str:
        return str(self.setup.gguf)

    def fmt(self) -> str:
        name = self.setup.gguf.name if self.setup.gguf else ""
        quant = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else "?"
        return f"GGUF {quant} (quantized weights)"

    def version(self) -> str:
        try:
            import llama_cpp

            gpu = "yes" if llama_cpp.llama_supports_gpu_offload() else "no"
        except Exception:  # not installed, or its shared library does not load
            gpu = "?"
        return f"llama-cpp-python {_version('llama_cpp_python')} (GPU offload in this build: {gpu})"


def _mlx_has_gpu() -> bool:
    try:
        import mlx.core as mx
    except ImportError:
        return False
    return mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())


SYSTEMS: dict[str, type[Server]] = {
    cls.name: cls for cls in (VllmMetal, MlxLm, LlamaCpp, VllmCpu)
}
