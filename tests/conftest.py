"""Shared fixtures: the bundled real model, live `vllm serve` processes, reference generators.

Servers are expensive on a 2-core CPU machine (about 35 s to start), so each configuration is
started once per session and shared by every test that needs it (under `scripts/test.sh`'s two
pytest-xdist workers: once per worker that runs such a test).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
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

from benchmarks.server import Exit, ServerProcess, free_port, run_until_exit, vllm_serve_command  # noqa: E402
from fixtures.bundled_model import DefaultModels, ensure_default_models  # noqa: E402

LOG_DIR = Path(os.environ.get("VLLM_METAL_TEST_LOGS", "/tmp/vllm-metal-test-logs"))
# VLLM_MLX_DEVICE of the servers tests start: the caller's (``scripts/gpu/`` sets gpu), else cpu.
SERVER_DEVICE = os.environ.get("VLLM_MLX_DEVICE", "cpu")


@pytest.fixture(scope="session")
def models() -> DefaultModels:
    return ensure_default_models()


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


def runner_step(worker, scheduled: dict[str, int], new=(), cached=None, finished=()):
    """One engine step built by hand: a ``SchedulerOutput`` that schedules ``scheduled`` (request id ->
    tokens) for the ``new`` and ``cached`` requests and finishes ``finished``, run by ``worker``.

    Returns the step's ``ModelRunnerOutput`` (sampled when the runner defers sampling; read from
    the device as the engine does when sampling returns an ``AsyncModelRunnerOutput``)."""
    from vllm.v1.outputs import AsyncModelRunnerOutput

    out = runner_launch(worker, scheduled, new, cached, finished)
    return out.get_output() if isinstance(out, AsyncModelRunnerOutput) else out


def runner_launch(worker, scheduled: dict[str, int], new=(), cached=None, finished=()):
    """``runner_step`` without reading the output: what ``sample_tokens`` returns, which under
    async scheduling may be an ``AsyncModelRunnerOutput`` the engine reads a step later."""
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput

    so = SchedulerOutput(
        scheduled_new_reqs=list(new),
        scheduled_cached_reqs=cached or CachedRequestData.make_empty(),
        num_scheduled_tokens=scheduled,
        total_num_scheduled_tokens=sum(scheduled.values()),
        scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={},
        finished_req_ids=set(finished),
        free_encoder_mm_hashes=[],
    )
    out = worker.execute_model(so)
    return worker.sample_tokens(None) if out is None else out


class VllmServer(ServerProcess):
    """A live ``vllm serve`` subprocess on loopback, started healthy; ``url`` is its OpenAI base URL.

    The MLX device is ``VLLM_MLX_DEVICE`` from the environment (``scripts/gpu/`` sets gpu), else cpu.
    """

    def __init__(self, model: Path, args: list[str], env: dict[str, str] | None = None,
                 name: str = "server", startup_timeout: float = 300.0,
                 command: Callable[[int], list[str]] | None = None):
        """``command(port)``: what to run instead of ``vllm serve MODEL --port port ARGS``."""
        port = free_port()
        command = command or (lambda p: vllm_serve_command(model, p, args))
        super().__init__(command(port), port, LOG_DIR / f"{name}-{port}.log",
                         env={"VLLM_MLX_DEVICE": SERVER_DEVICE, **(env or {})})
        self.model = str(model)
        self.url = f"{self.base}/v1"
        self.start(startup_timeout)

    def post(self, path: str, body: dict, timeout: float = 300) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=timeout)

    def metrics(self) -> dict[str, float]:
        """Prometheus samples as ``name{labels}`` -> value (label part dropped)."""
        return parse_metrics(httpx.get(f"{self.base}/metrics", timeout=10).text)


def serve_expecting_failure(model: Path | str, args: list[str], env: dict[str, str] | None = None,
                            name: str = "refused", timeout: float = 300) -> Exit:
    """``vllm serve`` expected to refuse to start: its exit code and output (log in ``LOG_DIR``).

    ``timeout`` is a hang detector (generous: CI machines are shared), not a speed requirement.
    """
    port = free_port()
    env = {"VLLM_MLX_DEVICE": SERVER_DEVICE, **(env or {})}
    return run_until_exit(vllm_serve_command(model, port, args), LOG_DIR / f"{name}-{port}.log", env, timeout)


# The main fp32 server: default uni executor, prefix caching on (vLLM's default), tool calling
# as Docker Model Runner and coding agents turn it on, at vLLM's own --tool-strict-level (auto;
# the plugin's default is parameter): test_structured declares its tools strict.
MAIN_ARGS = ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "16",
             "--kv-cache-memory-bytes", str(256 * 2**20), "--seed", "0",
             "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--tool-strict-level", "auto"]


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
