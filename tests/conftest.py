"""Shared fixtures: the bundled real model, live `vllm serve` processes, reference generators.

Servers are expensive on a 2-core CPU machine (about 35 s to start), so each configuration is
started once per session and shared by every test that needs it (under `scripts/test.sh`'s two
pytest-xdist workers: once per worker that runs such a test).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

# float32 references are exact float32 on GPUs too (MLX would use TF32 there), like the servers
# the tests start with --dtype float32; set before MLX's first matmul in this process.
os.environ.setdefault("MLX_ENABLE_TF32", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import vllm_metal  # noqa: E402

# What vLLM does in every process it starts, here too: MLX in this process (the mlx-lm references,
# the in-process runners) gets the CPU BLAS the servers get (VLLM_METAL_CPU_BLAS; it must come
# before MLX's first import). On the reference BLAS the mlx-lm references alone took minutes of
# the suite. HF transformers stays the reference that shares no arithmetic with MLX.
vllm_metal.register()

from fixtures.bundled_model import DefaultModels, ensure_default_models  # noqa: E402

LOG_DIR = Path(os.environ.get("VLLM_METAL_TEST_LOGS", "/tmp/vllm-metal-test-logs"))


@pytest.fixture(scope="session")
def models() -> DefaultModels:
    return ensure_default_models()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus samples as ``name`` -> value summed over labels."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        key = name.split("{")[0]
        try:
            out[key] = out.get(key, 0.0) + float(value)
        except ValueError:
            continue
    return out


def metal_worker(model_dir: Path, *, dtype: str, max_model_len: int, num_blocks: int, block_size: int):
    """A MetalWorker driven directly (no engine): loaded, with a KV cache of ``num_blocks``."""
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

    from vllm_metal.worker import MetalWorker

    cfg = EngineArgs(model=str(model_dir), dtype=dtype, max_model_len=max_model_len, max_num_seqs=4,
                     block_size=block_size).create_engine_config()
    with set_current_vllm_config(cfg):
        worker = MetalWorker(cfg, local_rank=0, rank=0, distributed_init_method="tcp://127.0.0.1:0")
        worker.init_device()
        worker.load_model()
        specs = worker.get_kv_cache_spec()
        spec = next(iter(specs.values()))
        worker.initialize_from_config(KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                                                    kv_cache_groups=[KVCacheGroupSpec(list(specs), spec)]))
        worker.compile_or_warm_up_model()  # as the engine does: its scratch steps must leave the pool be
    return worker


class VllmServer:
    """A live ``vllm serve`` subprocess on loopback; ``url`` is its OpenAI base URL."""

    def __init__(self, model: Path, args: list[str], env: dict[str, str] | None = None,
                 name: str = "server", startup_timeout: float = 300.0):
        self.model = str(model)
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/v1"
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{name}-{self.port}.log"
        cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", self.model,
               "--host", "127.0.0.1", "--port", str(self.port), *args]
        device = os.environ.get("VLLM_MLX_DEVICE", "cpu")  # scripts/gpu/ sets gpu
        full_env = {**os.environ, "VLLM_MLX_DEVICE": device, **(env or {})}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)
        self._wait(startup_timeout)

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"vllm serve did not become healthy in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        self._log.flush()
        return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-n:])

    def post(self, path: str, body: dict, timeout: float = 300) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=timeout)

    def metrics(self) -> dict[str, float]:
        """Prometheus samples as ``name{labels}`` -> value (label part dropped)."""
        return parse_metrics(httpx.get(f"{self.base}/metrics", timeout=10).text)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


# The main fp32 server: default uni executor, prefix caching on (vLLM's default), tool calling
# as Docker Model Runner and coding agents turn it on.
MAIN_ARGS = ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "16",
             "--kv-cache-memory-bytes", str(256 * 2**20), "--seed", "0",
             "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]


@pytest.fixture(scope="session")
def server(models: DefaultModels) -> Iterator[VllmServer]:
    srv = VllmServer(models.hf, MAIN_ARGS, name="main")
    yield srv
    srv.stop()


def completion_tokens(srv: VllmServer, prompt_ids: list[int], max_tokens: int, **extra) -> list[int]:
    """Greedy (unless overridden) completion of token ids; returns the generated token ids."""
    body = {"model": srv.model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, **extra}
    r = srv.post("/completions", body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]
