"""VLLM_METAL_CPU_BLAS: which library MLX's CPU matmuls call, as the dynamic linker reports it.

Each case runs a fresh interpreter with ``LD_DEBUG=bindings``: vLLM is imported and the plugin
registers (as in every ``vllm serve`` process), MLX multiplies two fp32 matrices on its CPU
device, glibc prints which library ``libmlx``'s ``cblas_sgemm`` was bound to, and the product must
equal NumPy's. ``register()`` runs in every vLLM process, so it must find the library without
starting a subprocess. The expected OpenBLAS comes from the system's linker cache (``ldconfig
-p``) or opencv-python-headless's file list, not from the plugin's lookup.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_metal.patches.mlx import system_libraries

PROBE = """
import sys
import numpy as np
import vllm.envs
if sys.argv[1] == "mlx-first":
    import mlx.core
spawned = []
sys.addaudithook(lambda event, args: event.startswith(("subprocess.", "os.posix_spawn", "os.exec",
                                                      "os.fork", "os.system")) and spawned.append(event))
import vllm_metal
vllm_metal.register()
assert not spawned, f"register() started processes: {spawned}"
import mlx.core as mx
from vllm_metal.patches import mlx as mlx_patches
rng = np.random.default_rng(0)
a, b = rng.standard_normal((64, 96), np.float32), rng.standard_normal((96, 48), np.float32)
with mx.stream(mx.cpu):
    got = np.array(mx.matmul(mx.array(a), mx.array(b)))
assert np.allclose(got, a @ b, rtol=1e-4, atol=1e-4), abs(got - a @ b).max()
print("CPU_BLAS=" + str(mlx_patches.CPU_BLAS))
"""
BINDING = re.compile(r"binding file (\S*libmlx\.so\S*) \[0\] to (\S+) \[0\]: normal symbol `cblas_sgemm'")


def _sgemm_binding(setting: str, order: str = "plugin-first") -> tuple[Path, str]:
    env = {**os.environ, "VLLM_METAL_CPU_BLAS": setting, "LD_DEBUG": "bindings"}
    out = subprocess.run([sys.executable, "-c", PROBE, order], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    bound = {m.group(2) for m in BINDING.finditer(out.stderr)}
    assert len(bound) == 1, f"libmlx's cblas_sgemm bindings: {bound}"
    return Path(bound.pop()).resolve(), out.stdout.strip().splitlines()[-1]


def _linker_cache(name: str) -> list[Path]:
    """The libraries ``lib<name>.so*`` the dynamic linker's cache lists, as ``ldconfig -p`` prints them."""
    # ldconfig lives in /sbin, which a non-login PATH may lack.
    ldconfig = shutil.which("ldconfig") or shutil.which("ldconfig", path="/sbin:/usr/sbin")
    assert ldconfig, "ldconfig not found"
    out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, check=True).stdout
    return [Path(line.split(" => ")[1]) for line in out.splitlines()
            if line.strip().startswith(f"lib{name}.so") and " => " in line]


@pytest.fixture(scope="module")
def openblas() -> Path:
    """The OpenBLAS ``auto`` must choose: the system's, else the one opencv-python-headless bundles."""
    system = _linker_cache("openblas")
    if system:
        return system[0].resolve()
    bundled = [f.locate() for f in importlib.metadata.files("opencv-python-headless") or []
               if f.name.startswith("libopenblas")]
    assert bundled, "no OpenBLAS found (opencv-python-headless, a vLLM dependency, bundles one)"
    return Path(bundled[0]).resolve()


def test_auto_binds_mlx_to_openblas(openblas):
    lib, reported = _sgemm_binding("auto")
    assert lib == openblas
    assert reported.startswith("CPU_BLAS=/") and Path(reported.removeprefix("CPU_BLAS=")).resolve() == openblas


def test_mlx_keeps_the_wheels_reference_blas():
    lib, reported = _sgemm_binding("mlx")
    assert re.fullmatch(r"libblas(-[0-9a-f]+)?\.so[.0-9]*", lib.name), lib
    assert reported == "CPU_BLAS=None"


def test_explicit_path_is_used(openblas):
    lib, reported = _sgemm_binding(str(openblas))
    assert lib == openblas and reported == f"CPU_BLAS={openblas}"


def test_too_late_once_mlx_is_imported():
    """Imported before the plugin, MLX has bound its own BLAS: nothing is swapped, and it says so."""
    lib, reported = _sgemm_binding("auto", order="mlx-first")
    assert "openblas" not in lib.name and reported == "CPU_BLAS=None"


def test_system_library_is_found_by_absolute_path():
    """A system OpenBLAS is found where the linker finds it, as an absolute path (what
    VLLM_METAL_CPU_BLAS takes and the worker logs)."""
    found = [Path(p).resolve() for p in system_libraries("m")]
    assert all(p.is_absolute() and p.is_file() for p in found)
    assert {p.resolve() for p in _linker_cache("m")} <= set(found)
    assert system_libraries("vllm-metal-no-such-library") == []


def test_blas_threads_follow_the_setting():
    """VLLM_METAL_CPU_BLAS_THREADS as the loaded OpenBLAS reports it: a number holds for every step;
    ``auto`` gives a step of one request every core it was given and a step of many one fewer."""
    import ctypes

    from vllm_metal.patches import mlx as mlx_patches

    assert mlx_patches.CPU_BLAS, "the test process loaded no OpenBLAS (conftest registers the plugin first)"
    threads = ctypes.CDLL(mlx_patches.CPU_BLAS).openblas_get_num_threads
    before = threads()
    try:
        fixed = mlx_patches.CpuBlasThreads(1, 2)
        for requests in (1, 64):
            fixed.for_step(requests)
            assert threads() == 1
        auto = mlx_patches.CpuBlasThreads("auto", 2)
        auto.for_step(1)
        assert threads() == 2
        auto.for_step(16)
        assert threads() == 1
    finally:
        mlx_patches.set_cpu_blas_threads(before)
