"""The plugin's environment variables: parsing, validation messages, combinations, docs."""

from __future__ import annotations

import _ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_metal import envs
from vllm_metal.envs import ENV_VARS, MetalConfigError, configuration_markdown, load
from vllm_metal.patches.mlx import openblas_candidates

NAMES = [var.name for var in ENV_VARS]
DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

# Values each variable must refuse. A variable added to ENV_VARS must be added here too (or to
# ACCEPTS_ANYTHING), see test_every_variable_is_covered.
INVALID = {
    "VLLM_METAL_MEMORY_FRACTION": ["0", "0.0", "-0.5", "1.5", "x", "", "nan", "inf", "auto-ish"],
    "VLLM_METAL_USE_MLX": ["maybe", "2", "-1", "tru"],
    "VLLM_MLX_DEVICE": ["metal", "cuda", "", "gpu0", "mps"],
    "VLLM_METAL_BLOCK_SIZE": ["15", "0", "-16", "4", "256", "x", "16.0", ""],
    "VLLM_METAL_USE_PAGED_ATTENTION": ["maybe", "2", "paged"],
    "VLLM_METAL_DEBUG": ["verbose", "2"],
    "VLLM_USE_MODELSCOPE": ["maybe", "2"],
    "VLLM_METAL_PREFIX_CACHE": ["maybe", "2", "auto"],
    "VLLM_METAL_ONE_STEP_AHEAD": ["maybe", "2", "yes", ""],
    "VLLM_METAL_KV_IN_PLACE": ["copy", "2"],
    "VLLM_METAL_DISTRIBUTED_BACKEND": ["mpi", "tcp", ""],
    "VLLM_METAL_PREFIX_CACHE_FRACTION": ["0", "1.5", "x", "auto", "", "-1"],
    "VLLM_METAL_ATTENTION_MB": ["0", "-5", "1.5", "lots", "", "64MB"],
    "VLLM_METAL_ATTENTION_KERNEL": ["cuda", "metal", "1", ""],
    "VLLM_METAL_DEQUANTIZE_ROWS": ["-1", "1.5", "never", ""],
    "VLLM_METAL_QUANTIZED_KERNEL": ["cuda", "1", ""],
    "VLLM_METAL_CPU_BLAS_THREADS": ["0", "-2", "1.5", "all", ""],
    # a name, not a path; relative; missing; a file that is no library; a library without CBLAS
    "VLLM_METAL_CPU_BLAS": ["openblas", "", "lib/libopenblas.so", "/nonexistent/libopenblas.so",
                            __file__, _ctypes.__file__],
}
ACCEPTS_ANYTHING = {"VLLM_METAL_MODELSCOPE_CACHE", "VLLM_METAL_HOSTFILE"}  # paths; empty means unset

DEFAULTS = envs.MetalEnvs(
    memory_fraction="auto", attention_mb="auto", attention_kernel="auto", dequantize_rows="auto", quantized_kernel="off",
    use_mlx=True,
    mlx_device="auto", cpu_blas="auto", cpu_blas_threads="auto", block_size=16,
    use_paged_attention=True, debug=False, one_step_ahead="auto", kv_in_place=True, distributed_backend="auto", hostfile=None,
    use_modelscope=False, modelscope_cache=None,
    prefix_cache=False, prefix_cache_fraction=0.05, prefix_cache_set=False,
)


def test_every_variable_is_covered():
    assert len(set(NAMES)) == len(NAMES)
    assert set(INVALID) | ACCEPTS_ANYTHING == set(NAMES)
    assert all(name.startswith("VLLM_") for name in NAMES)


def test_defaults():
    assert load(environ={}) == DEFAULTS


@pytest.mark.parametrize("var", ENV_VARS, ids=NAMES)
def test_default_parses(var):
    var.parse(var.name, var.default)  # must not raise
    assert load(environ={var.name: var.default}) == DEFAULTS


@pytest.mark.parametrize(
    "name,value", [(n, v) for n, values in INVALID.items() for v in values],
    ids=[f"{n}={v!r}" for n, values in INVALID.items() for v in values],
)
def test_invalid_value_names_variable(name, value):
    with pytest.raises(MetalConfigError) as exc:
        load(environ={name: value})
    assert name in str(exc.value)
    assert repr(value) in str(exc.value)  # and shows what was given


def test_config_error_is_value_error():
    assert issubclass(MetalConfigError, ValueError)


def test_reads_os_environ_by_default(monkeypatch):
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VLLM_METAL_BLOCK_SIZE", "64")
    monkeypatch.setenv("VLLM_MLX_DEVICE", "cpu")
    cfg = load()
    assert cfg.block_size == 64
    assert cfg.mlx_device == "cpu"
    monkeypatch.setenv("VLLM_METAL_BLOCK_SIZE", "15")
    with pytest.raises(MetalConfigError, match="VLLM_METAL_BLOCK_SIZE"):
        load()


@pytest.mark.parametrize("raw,value", [
    ("1", True), ("true", True), ("TRUE", True), (" yes ", True), ("on", True),
    ("0", False), ("false", False), ("No", False), ("off", False), ("", False),
])
def test_boolean_spellings(raw, value):
    assert load(environ={"VLLM_METAL_DEBUG": raw}).debug is value


def test_valid_spellings():
    assert load(environ={"VLLM_MLX_DEVICE": " CPU "}).mlx_device == "cpu"
    assert load(environ={"VLLM_METAL_MEMORY_FRACTION": "AUTO"}).memory_fraction == "auto"
    assert load(environ={"VLLM_METAL_MEMORY_FRACTION": "1"}).memory_fraction == 1.0
    assert load(environ={"VLLM_METAL_MODELSCOPE_CACHE": "~/ms"}).modelscope_cache == \
        os.path.expanduser("~/ms")
    for size in (8, 16, 32, 64, 128):
        assert load(environ={"VLLM_METAL_BLOCK_SIZE": str(size)}).block_size == size
    assert load(environ={"VLLM_METAL_CPU_BLAS": " MLX "}).cpu_blas == "mlx"
    assert load(environ={"VLLM_METAL_DEQUANTIZE_ROWS": " AUTO "}).dequantize_rows == "auto"
    assert load(environ={"VLLM_METAL_DEQUANTIZE_ROWS": "0"}).dequantize_rows == 0
    assert load(environ={"VLLM_METAL_DEQUANTIZE_ROWS": "256"}).dequantize_rows == 256
    assert load(environ={"VLLM_METAL_CPU_BLAS_THREADS": "Auto"}).cpu_blas_threads == "auto"
    assert load(environ={"VLLM_METAL_CPU_BLAS_THREADS": "1"}).cpu_blas_threads == 1
    openblas = openblas_candidates()
    assert openblas, "no OpenBLAS found (opencv-python-headless, a vLLM dependency, bundles one)"
    assert load(environ={"VLLM_METAL_CPU_BLAS": openblas[0]}).cpu_blas == openblas[0]


def test_cpu_blas_messages_say_why():
    with pytest.raises(MetalConfigError, match="does not export cblas_sgemm"):
        load(environ={"VLLM_METAL_CPU_BLAS": _ctypes.__file__})
    with pytest.raises(MetalConfigError, match="absolute path of an existing CBLAS"):
        load(environ={"VLLM_METAL_CPU_BLAS": "/nonexistent/libopenblas.so"})


# --- combinations -------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", ["0.7", "1", "0.05"])
def test_numeric_fraction_without_paged_path_is_invalid(fraction):
    with pytest.raises(MetalConfigError) as exc:
        load(environ={"VLLM_METAL_MEMORY_FRACTION": fraction, "VLLM_METAL_USE_PAGED_ATTENTION": "0"})
    msg = str(exc.value)
    assert "VLLM_METAL_MEMORY_FRACTION" in msg
    assert "VLLM_METAL_USE_PAGED_ATTENTION=1" in msg
    assert "paged" in msg


def test_auto_without_paged_path_selects_mlx_managed_cache():
    cfg = load(environ={"VLLM_METAL_MEMORY_FRACTION": "auto", "VLLM_METAL_USE_PAGED_ATTENTION": "0"})
    assert cfg.memory_fraction == "auto" and not cfg.use_paged_attention


def test_paged_path_combinations_valid():
    cfg = load(environ={"VLLM_METAL_MEMORY_FRACTION": "auto", "VLLM_METAL_USE_PAGED_ATTENTION": "1"})
    assert cfg.memory_fraction == "auto" and cfg.use_paged_attention
    cfg = load(environ={"VLLM_METAL_MEMORY_FRACTION": "0.7", "VLLM_METAL_USE_PAGED_ATTENTION": "1"})
    assert cfg.memory_fraction == 0.7 and cfg.use_paged_attention


def test_use_mlx_zero_refused_pointing_at_vllm_plugins():
    with pytest.raises(MetalConfigError) as exc:
        load(environ={"VLLM_METAL_USE_MLX": "0"})
    msg = str(exc.value)
    assert "VLLM_METAL_USE_MLX" in msg
    assert "VLLM_PLUGINS" in msg
    assert load(environ={"VLLM_METAL_USE_MLX": "1"}).use_mlx


@pytest.mark.parametrize("value", ["0", "1.5", "x"])
def test_prefix_cache_fraction_invalid(value):
    with pytest.raises(MetalConfigError, match="VLLM_METAL_PREFIX_CACHE_FRACTION"):
        load(environ={"VLLM_METAL_PREFIX_CACHE_FRACTION": value})


def test_prefix_cache_fraction_valid():
    assert load(environ={"VLLM_METAL_PREFIX_CACHE_FRACTION": "1"}).prefix_cache_fraction == 1.0
    assert load(environ={"VLLM_METAL_PREFIX_CACHE_FRACTION": "0.25"}).prefix_cache_fraction == 0.25


def test_block_size():
    with pytest.raises(MetalConfigError, match="VLLM_METAL_BLOCK_SIZE"):
        load(environ={"VLLM_METAL_BLOCK_SIZE": "15"})
    cfg = load(environ={"VLLM_METAL_BLOCK_SIZE": "32"})
    assert cfg.block_size == 32


@pytest.mark.parametrize("raw,is_set,enabled", [
    (None, False, False), ("", False, False), ("1", True, True), ("0", True, False),
])
def test_prefix_cache_set(raw, is_set, enabled):
    """Unset/empty leaves vLLM's setting alone; 1 and 0 both count as set (0 turns it off)."""
    cfg = load(environ={} if raw is None else {"VLLM_METAL_PREFIX_CACHE": raw})
    assert cfg.prefix_cache_set is is_set
    assert cfg.prefix_cache is enabled


# --- vLLM's table ------------------------------------------------------------------------


def test_register_with_vllm(monkeypatch):
    import vllm.envs as vllm_envs

    def added_by_plugin(fn) -> bool:  # register_with_vllm binds the EnvVar as a default
        return any(isinstance(d, envs.EnvVar) for d in (getattr(fn, "__defaults__", None) or ()))

    # vLLM's table without anything the plugin may already have added in this process.
    table = {k: v for k, v in vllm_envs.environment_variables.items()
             if not added_by_plugin(v) and k not in envs.OTHER_VARS}
    ours_in_vllm = {k: v for k, v in table.items() if k in NAMES}
    assert "VLLM_USE_MODELSCOPE" in ours_in_vllm  # vLLM defines this one itself
    assert not any(k.startswith("VLLM_METAL_") for k in table)
    monkeypatch.setattr(vllm_envs, "environment_variables", table)
    envs.register_with_vllm()
    for name in (*NAMES, *envs.OTHER_VARS):
        assert name in vllm_envs.environment_variables, name
        assert callable(vllm_envs.environment_variables[name])
    # A variable vLLM already defines keeps vLLM's definition.
    for name, fn in ours_in_vllm.items():
        assert vllm_envs.environment_variables[name] is fn
    # The registered getters parse the live environment with the plugin's parser.
    monkeypatch.setenv("VLLM_METAL_BLOCK_SIZE", "32")
    monkeypatch.delenv("VLLM_METAL_MEMORY_FRACTION", raising=False)
    assert vllm_envs.environment_variables["VLLM_METAL_BLOCK_SIZE"]() == 32
    assert vllm_envs.environment_variables["VLLM_METAL_MEMORY_FRACTION"]() == "auto"
    # Registering twice changes nothing.
    before = dict(vllm_envs.environment_variables)
    envs.register_with_vllm()
    assert vllm_envs.environment_variables == before


# --- docs --------------------------------------------------------------------------------


def test_configuration_markdown_table():
    table = configuration_markdown()
    lines = table.rstrip("\n").split("\n")
    assert lines[0] == "| Variable | Default | Description |"
    assert len(lines) == 2 + len(ENV_VARS)
    for line, var in zip(lines[2:], ENV_VARS, strict=True):
        assert line.startswith(f"| `{var.name}` |")
        assert line.count(" | ") == 2  # no stray column separators from a description


def test_docs_contain_generated_table():
    """docs/configuration.md holds the table generated from ENV_VARS, verbatim.
    Regenerate it with `python -m vllm_metal.envs` when a variable changes."""
    text = DOC.read_text()
    table = configuration_markdown()
    assert table in text, (
        "docs/configuration.md is out of date; replace its table with the output of "
        "`python -m vllm_metal.envs`"
    )
    assert text.count("| Variable | Default | Description |") == 1


def test_envs_main_prints_table():
    out = subprocess.run([sys.executable, "-m", "vllm_metal.envs"], capture_output=True, text=True,
                         check=True, cwd=DOC.parents[1]).stdout
    assert out == configuration_markdown()
