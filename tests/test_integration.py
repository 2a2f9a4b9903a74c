"""How others launch and inspect the plugin: Docker Model Runner's exact command line, the
`doctor` report, the package version, and ModelScope ids resolved from a local cache."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest
from conftest import LOG_DIR, ServerProcess, free_port

import vllm_metal


def test_docker_model_runner_launch_line(models):
    """DMR verifies an install by importing vllm_metal, then runs exactly this line over TCP."""
    subprocess.run([sys.executable, "-c", "import vllm_metal"], check=True)
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(models.mlx),
           "--served-model-name", "ai/smollm2", "--enable-auto-tool-choice",
           "--tool-call-parser", "hermes", "--max-model-len", "1024", "--port", str(port)]
    srv = ServerProcess(cmd, port, LOG_DIR / f"dmr-{port}.log", env={"VLLM_MLX_DEVICE": "cpu"})
    try:
        srv.start(timeout=300)
        listed = httpx.get(f"{srv.base}/v1/models", timeout=10).json()
        assert [m["id"] for m in listed["data"]] == ["ai/smollm2"]
        r = httpx.post(f"{srv.base}/v1/completions", timeout=120, json={
            "model": "ai/smollm2", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        r = httpx.post(f"{srv.base}/v1/chat/completions", timeout=120, json={
            "model": "ai/smollm2", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert r.status_code == 200
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
    finally:
        srv.stop()


def test_version_matches_distribution():
    assert vllm_metal.__version__ == importlib.metadata.version("vllm-metal")


def test_doctor_reports_and_smoke_generates():
    out = subprocess.run([sys.executable, "-m", "vllm_metal", "doctor", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout)
    assert info["vllm_platform"] == "MetalPlatform"
    assert info["versions"]["mlx"] == importlib.metadata.version("mlx")
    assert info["config"]["block_size"] == 16 and info["mlx"]["device"] in ("cpu", "gpu (metal)", "gpu (cuda)")
    smoke = subprocess.run([sys.executable, "-m", "vllm_metal", "doctor", "--smoke"],
                           capture_output=True, text=True, timeout=300)
    assert smoke.returncode == 0, smoke.stdout[-2000:] + smoke.stderr[-2000:]
    assert "(equal to mlx-lm) -- OK" in smoke.stdout


def test_doctor_flags_bad_config():
    env = {**os.environ, "VLLM_METAL_BLOCK_SIZE": "7"}
    out = subprocess.run([sys.executable, "-m", "vllm_metal", "doctor"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 2 and "VLLM_METAL_BLOCK_SIZE" in out.stdout


MS_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _engine_model(model: str, monkeypatch, env: dict[str, str]) -> str:
    code = ("from vllm.engine.arg_utils import EngineArgs; "
            f"print(EngineArgs(model={model!r}, max_model_len=128).create_engine_config().model_config.model)")
    full = {**os.environ, "VLLM_USE_MODELSCOPE": "True", **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


@pytest.mark.parametrize("layout", ["models/HuggingFaceTB/SmolLM2-135M-Instruct",
                                    "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_modelscope_id_resolves_from_local_cache(models, tmp_path, monkeypatch, layout):
    target = tmp_path / "ms-cache" / layout
    target.parent.mkdir(parents=True)
    shutil.copytree(models.hf, target, ignore=shutil.ignore_patterns("*.safetensors"))
    out = _engine_model(MS_ID, monkeypatch, {"MODELSCOPE_CACHE": str(tmp_path / "ms-cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(target)
    # VLLM_METAL_MODELSCOPE_CACHE may also point straight at the model directory
    out = _engine_model(MS_ID, monkeypatch, {"VLLM_METAL_MODELSCOPE_CACHE": str(target)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(target)


def test_modelscope_missing_model_names_where_it_looked(tmp_path, monkeypatch):
    out = _engine_model("nobody/no-such-model", monkeypatch, {"MODELSCOPE_CACHE": str(tmp_path)})
    assert out.returncode != 0
    assert "not in the local ModelScope cache" in out.stderr
    assert str(tmp_path / "models" / "nobody" / "no-such-model") in out.stderr
    assert "VLLM_METAL_MODELSCOPE_CACHE" in out.stderr
