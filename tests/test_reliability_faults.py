"""Startup faults fail fast with a message that names the problem and the fix (never a hang, never
a bare stack trace), and a dead engine is reported by the API server instead of hanging it.

Faults use the tiny random llama (reliability.tiny): they exercise loading and the checks in
front of it, where the model's size only adds time. The memory-fraction variant of "does not
fit" is in test_platform.py::test_startup_that_cannot_fit_names_the_knob.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import Exit, VllmServer, serve_expecting_failure
from reliability.procs import engine_core, wait_for

pytest_plugins = ("reliability.fixtures",)

ARGS = ["--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory-bytes", str(16 * 2**20)]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(model: Path) -> None:
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)


def _garbage_header(model: Path) -> None:
    with (model / "model.safetensors").open("r+b") as f:
        f.seek(8)
        f.write(b"GARBAGE!")


def _drop_tokenizer(model: Path) -> None:
    for path in model.glob("tokenizer*"):
        path.unlink()


def _architecture(model_type: str, arch: str) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        config.update(model_type=model_type, architectures=[arch])
        (model / "config.json").write_text(json.dumps(config))

    return edit


# id -> (edit of a copy of the tiny checkpoint, extra args, phrases the output must contain)
FAULTS: dict[str, tuple[Callable[[Path], None] | None, list[str], list[str]]] = {
    "kv-budget-below-one-request": (None, ["--max-model-len", "2048", "--kv-cache-memory-bytes", "200000"],
                                    ["vllm-metal: --kv-cache-memory-bytes 200000", "lower --max-model-len"]),
    "truncated-safetensors": (_truncate, [], ["model.safetensors is corrupt or incomplete",
                                              "Download or convert the checkpoint again"]),
    "garbage-safetensors-header": (_garbage_header, [], ["model.safetensors is corrupt or incomplete",
                                                         "header is not valid JSON"]),
    "missing-tokenizer": (_drop_tokenizer, [], ["vllm-metal: no tokenizer in", "--tokenizer PATH",
                                                "--skip-tokenizer-init"]),
    "architecture-mlx-lm-lacks": (_architecture("opt", "OPTForCausalLM"), [],
                                  ["model_type 'opt') is not supported", "Supported model types: "]),
    "architecture-nobody-knows": (_architecture("frobnicator", "FrobnicatorForCausalLM"), [],
                                  ["model type `frobnicator`", "does not recognize this architecture"]),
}


@pytest.fixture(scope="module")
def fault_runs(tiny_model, tmp_path_factory) -> dict[str, Exit]:
    """Every faulty startup, three at a time (each is mostly vLLM's import time)."""
    root = tmp_path_factory.mktemp("faults")

    def run(item):
        fault_id, (edit, args, _) = item
        model = tiny_model
        if edit is not None:
            model = _copy(tiny_model, root / fault_id)
            edit(model)
        return fault_id, serve_expecting_failure(model, ARGS + args, name=f"fault-{fault_id}")

    with ThreadPoolExecutor(3) as pool:
        return dict(pool.map(run, FAULTS.items()))


@pytest.mark.parametrize("fault_id", list(FAULTS))
def test_startup_fault_fails_fast_naming_problem_and_fix(fault_runs, fault_id):
    run = fault_runs[fault_id]
    print(f"{fault_id}: exit {run.returncode} after {run.seconds:.0f}s")
    assert run.returncode is not None, f"hung:\n{run.tail()}"
    assert run.returncode != 0
    for phrase in FAULTS[fault_id][2]:
        assert phrase.lower() in run.output.lower(), f"{phrase!r} missing:\n{run.tail()}"
    # the message is an error line of its own (an exception's or the log's), not a traceback frame
    key = FAULTS[fault_id][2][0].lower()
    assert any(key in line.lower() and "error" in line.lower() for line in run.output.splitlines()), run.tail()


def test_engine_death_is_reported_not_hung(tiny_model):
    """SIGKILL the engine core mid-stream: the stream ends, /health stops answering 200 and a new
    request gets a 5xx or a refused connection, each within a client timeout."""
    srv = VllmServer(tiny_model, ARGS + ["--max-num-seqs", "4"], name="reliability-engine-death")
    try:
        ended = threading.Event()
        events = []

        def stream():
            body = {"model": srv.model, "prompt": "Once upon a time", "max_tokens": 200,
                    "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", f"{srv.url}/completions", json=body, timeout=60) as r:
                    for line in r.iter_lines():
                        events.append(line)
            except httpx.HTTPError as exc:
                events.append(f"error: {exc!r}")
            ended.set()

        core = engine_core(srv.proc.pid)
        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert wait_for(lambda: len(events) >= 2, 120), "the stream never started"
        os.kill(core.pid, signal.SIGKILL)
        assert ended.wait(120), "the open stream hung after the engine died"
        assert len([e for e in events if e.startswith("data: {")]) < 200

        def health_failed() -> bool:
            try:
                return httpx.get(f"{srv.base}/health", timeout=10).status_code != 200
            except httpx.HTTPError:
                return True

        assert wait_for(health_failed, 120), "/health still answers 200 with a dead engine"
        try:
            r = httpx.post(f"{srv.url}/completions", timeout=60,
                           json={"model": srv.model, "prompt": "hi", "max_tokens": 2})
            assert r.status_code >= 500, (r.status_code, r.text)
        except (httpx.ConnectError, httpx.RemoteProtocolError):
            pass  # the API server exited: also a prompt, clear failure
    finally:
        srv.stop()


def test_preflight_accepts_real_checkpoints(models, tiny_model):
    """The checkpoint checks behind the faults above pass every checkpoint we ship or build."""
    from vllm_metal import preflight

    for checkpoint in (models.hf, models.mlx, models.mlx_4bit, tiny_model):
        preflight.check_weights(checkpoint)
        preflight.check_tokenizer(checkpoint)
        assert all(preflight.safetensors_problem(p) is None for p in checkpoint.glob("*.safetensors"))
