"""VLLM_METAL_CPU_BLAS: which library MLX's CPU matmuls call, as the dynamic linker reports it.

Each case runs a fresh interpreter with ``LD_DEBUG=bindings``: the plugin registers (as in every
``vllm serve`` process), MLX multiplies two fp32 matrices on its CPU device, glibc prints which
library ``libmlx``'s ``cblas_sgemm`` was bound to, and the product must equal NumPy's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_metal import compat

PROBE = """
import sys
import numpy as np
if sys.argv[1] == "mlx-first":
    import mlx.core
import vllm_metal
vllm_metal.register()
import mlx.core as mx
from vllm_metal import compat
rng = np.random.default_rng(0)
a, b = rng.standard_normal((64, 96), np.float32), rng.standard_normal((96, 48), np.float32)
with mx.stream(mx.cpu):
    got = np.array(mx.matmul(mx.array(a), mx.array(b)))
assert np.allclose(got, a @ b, rtol=1e-4, atol=1e-4), abs(got - a @ b).max()
print("CPU_BLAS=" + str(compat.CPU_BLAS))
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


@pytest.fixture(scope="module")
def openblas() -> Path:
    found = compat._openblas_candidates()
    assert found, "no OpenBLAS found (opencv-python-headless, a vLLM dependency, bundles one)"
    return Path(found[0]).resolve()


def test_auto_binds_mlx_to_openblas(openblas):
    assert compat._mlx_bundles_reference_blas()  # the condition auto acts on (mlx-cpu on Linux)
    lib, reported = _sgemm_binding("auto")
    assert lib == openblas
    assert reported == f"CPU_BLAS={compat._openblas_candidates()[0]}"


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
    """A system OpenBLAS is found by soname; VLLM_METAL_CPU_BLAS and the log need its file's path."""
    libm = compat._system_library_path("m")
    assert libm and Path(libm).is_absolute() and Path(libm).is_file() and Path(libm).name.startswith("libm.so")
    assert compat._system_library_path("vllm-metal-no-such-library") is None
