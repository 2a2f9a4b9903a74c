"""How people launch and inspect the plugin: the quick start, Docker Model Runner's exact command line, the
`doctor` report, the package version, and ModelScope ids resolved from a local cache."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import pytest
from conftest import LOG_DIR, ServerProcess, free_port, vllm_serve_command

import vllm_metal

# A forced call to one tool; SmolLM2's chat template does not render tools, so the system prompt
# shows the call format.
CITY = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 12}},
        "required": ["city"], "additionalProperties": False}
TOOL_SYSTEM = ('You can call get_weather(city). Call it like this:\n<tool_call>\n'
               '{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')


def _forced_weather_calls(base: str, model: str, strict: bool | None, n: int = 2) -> list[dict]:
    """The arguments of ``n`` sampled calls forced to get_weather (one per seed)."""
    function = {"name": "get_weather", "description": "Current weather in a city", "parameters": CITY}
    if strict is not None:
        function["strict"] = strict
    out = []
    for seed in range(n):
        r = httpx.post(f"{base}/v1/chat/completions", timeout=300, json={
            "model": model, "max_tokens": 40, "temperature": 1.0, "seed": seed,
            "tools": [{"type": "function", "function": function}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "messages": [{"role": "system", "content": TOOL_SYSTEM},
                         {"role": "user", "content": "What is the weather in Paris?"}]})
        assert r.status_code == 200, r.text
        (call,) = r.json()["choices"][0]["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        out.append(json.loads(call["function"]["arguments"]))
    return out


def test_docker_model_runner_launch_line(models, monkeypatch):
    """DMR verifies an install by importing vllm_metal, then runs exactly this line over TCP (on
    the device VLLM_MLX_DEVICE's default picks)."""
    subprocess.run([sys.executable, "-c", "import vllm_metal"], check=True)
    monkeypatch.delenv("VLLM_MLX_DEVICE", raising=False)
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(models.mlx),
           "--served-model-name", "ai/smollm2", "--enable-auto-tool-choice",
           "--tool-call-parser", "hermes", "--max-model-len", "1024", "--port", str(port)]
    srv = ServerProcess(cmd, port, LOG_DIR / f"dmr-{port}.log")
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
        for args in _forced_weather_calls(srv.base, "ai/smollm2", strict=True):
            jsonschema.validate(args, CITY)
    finally:
        srv.stop()


def _forced_weather_uses(base: str, model: str, n: int = 2) -> list[dict]:
    """The inputs of ``n`` Anthropic /v1/messages calls forced to a get_weather tool without ``strict``."""
    out = []
    for _ in range(n):
        r = httpx.post(f"{base}/v1/messages", timeout=300, json={
            "model": model, "max_tokens": 40, "temperature": 1.0, "system": TOOL_SYSTEM,
            "tools": [{"name": "get_weather", "description": "Current weather in a city", "input_schema": CITY}],
            "tool_choice": {"type": "tool", "name": "get_weather"},
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}]})
        assert r.status_code == 200, r.text  # the model's own output is never a client error
        (use,) = [b for b in r.json()["content"] if b["type"] == "tool_use"]
        assert use["name"] == "get_weather"
        out.append(use["input"])
    return out


# What scripts/quickstart.sh serves, after the model path.
QUICK_START_ARGS = ["--served-model-name", "smollm2", "--max-model-len", "2048", "--enable-auto-tool-choice",
                    "--tool-call-parser", "hermes"]
# Warnings about the machine, not the plugin: vLLM's on a hard open-files limit below 65536, and on
# VLLM_* variables of the caller's environment that neither vLLM nor this project defines.
MACHINE_WARNINGS = re.compile(r"Found ulimit of|Unknown vLLM environment variable detected: VLLM_(?!METAL_|MLX_)")


def test_quick_start_serves_with_a_clean_log_and_stops_cleanly(models, monkeypatch):
    """The quick start's server, with the defaults a new user gets: it logs no warning or error,
    says once per process which device MLX runs on, holds every forced tool call to the tool's
    schema (OpenAI and Anthropic routes), and a Ctrl-C stop exits 0 with no leak report."""
    quickstart = (Path(__file__).parents[1] / "scripts" / "quickstart.sh").read_text()
    assert " ".join(QUICK_START_ARGS[4:]) in quickstart
    monkeypatch.delenv("VLLM_MLX_DEVICE", raising=False)
    port = free_port()
    srv = ServerProcess(vllm_serve_command(models.mlx, port, QUICK_START_ARGS), port,
                        LOG_DIR / f"quickstart-{port}.log")
    try:
        srv.start(timeout=300)
        r = httpx.post(f"{srv.base}/v1/chat/completions", timeout=120, json={
            "model": "smollm2", "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
        # Tools without `strict`: the plugin's default --tool-strict-level (parameter) holds forced
        # calls' arguments to the schema on both routes.
        for args in _forced_weather_calls(srv.base, "smollm2", strict=None) + _forced_weather_uses(srv.base, "smollm2"):
            jsonschema.validate(args, CITY)
        os.killpg(srv.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        assert srv.proc.wait(timeout=120) == 0
    finally:
        srv.stop()
    log = srv.log_path.read_text(errors="replace")
    flagged = [line for line in log.splitlines()
               if re.search(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|nanobind|leaked|resource_tracker", line)
               and not MACHINE_WARNINGS.search(line)]
    assert not flagged, "\n".join(flagged)
    device_lines = re.findall(r"MLX platform active on .*\(VLLM_MLX_DEVICE=auto, pid \d+\)", log)
    assert 1 <= len(device_lines) == len(set(device_lines)), device_lines


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
    # The device it reports is the one VLLM_MLX_DEVICE gives the server, and an unset
    # VLLM_METAL_PREFIX_CACHE is not reported as prefix caching off.
    from vllm_metal.device import resolve_device

    assert info["mlx"]["device"].split()[0] == resolve_device(info["config"]["mlx_device"])
    if "VLLM_METAL_PREFIX_CACHE" not in os.environ:
        assert info["config"]["prefix_cache"] is not False and "vLLM" in info["config"]["prefix_cache"]
    smoke = subprocess.run([sys.executable, "-m", "vllm_metal", "doctor", "--smoke"],
                           capture_output=True, text=True, timeout=300)
    assert smoke.returncode == 0, smoke.stdout[-2000:] + smoke.stderr[-2000:]
    assert "(equal to mlx-lm) -- OK" in smoke.stdout
    noise = [line for line in (smoke.stdout + smoke.stderr).splitlines()
             if re.search(r"\b(WARNING|ERROR)\b|Traceback", line)]
    assert not noise, "\n".join(noise)


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
