"""Patches of MLX's Linux wheel: the BLAS behind its CPU matmuls."""

from __future__ import annotations

import ctypes
import glob
import importlib.metadata
import os
import re
import sys

CPU_BLAS: str | None = None  # the CBLAS library load_cpu_blas put behind MLX in this process


def load_cpu_blas(setting: str) -> str | None:
    """Put an optimized CBLAS behind MLX's CPU matmuls; return its path, or None if MLX keeps its own.

    MLX's Linux CPU wheel (``mlx-cpu``) bundles netlib's reference BLAS (``libblas-*.so.3``): one
    thread, no blocking, so a matmul of N rows costs N times one row, and batching pays nothing
    on MLX's CPU backend (docs/benchmarks.md has the numbers). ``libmlx`` binds ``cblas_sgemm``
    when it is first loaded, so a CBLAS loaded with RTLD_GLOBAL before ``import mlx.core`` takes
    its place (too late afterwards: this returns None then). ``setting`` is
    ``VLLM_METAL_CPU_BLAS`` (validated by envs). It runs in every vLLM process, so the lookup
    reads files only: no subprocess, no library loaded but the one chosen.

    Delete when: MLX's Linux wheels link an optimized BLAS themselves.
    """
    from vllm_metal.envs import exports_cblas

    global CPU_BLAS
    if CPU_BLAS is not None or setting == "mlx" or "mlx.core" in sys.modules:
        return CPU_BLAS
    if setting == "auto":
        if not mlx_bundles_reference_blas():
            return None
        candidates = openblas_candidates()
    else:
        candidates = [setting]
    for path in filter(exports_cblas, candidates):
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # promote: libmlx binds to it on import
        CPU_BLAS = path
        return path
    return None


def mlx_bundles_reference_blas() -> bool:
    """Whether an installed MLX wheel ships netlib's BLAS (auditwheel names it libblas-<hash>.so.3...)."""
    for dist in ("mlx-cpu", "mlx-cuda-13", "mlx-cuda-12", "mlx"):
        try:
            files = importlib.metadata.files(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        if any(re.fullmatch(r"libblas(-[0-9a-f]+)?\.so[.0-9]*", f.name) for f in files):
            return True
    return False


def openblas_candidates() -> list[str]:
    """The system's OpenBLAS, then the one opencv-python-headless bundles (vLLM depends on it);
    absolute paths (what VLLM_METAL_CPU_BLAS accepts and the worker logs)."""
    found = system_libraries("openblas")
    for dist, libs in (("opencv-python-headless", "opencv_python_headless.libs"),
                       ("opencv-python", "opencv_python.libs")):
        try:
            libs_dir = importlib.metadata.distribution(dist).locate_file(libs)
        except importlib.metadata.PackageNotFoundError:
            continue
        found += sorted(glob.glob(os.path.join(str(libs_dir), "libopenblas*.so*")))
    return found


def library_dirs() -> list[str]:
    """Where the dynamic linker looks for shared libraries, in its order: LD_LIBRARY_PATH, then
    the system directories (multiarch ones included)."""
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    for root in ("/usr/local/lib", "/usr/lib", "/lib"):
        dirs += sorted(glob.glob(f"{root}/*-linux-gnu*")) + [f"{root}64", root]
    seen: set[str] = set()
    unique = []
    for d in dirs:
        real = os.path.realpath(d)  # /lib is often /usr/lib
        if os.path.isdir(d) and real not in seen:
            seen.add(real)
            unique.append(d)
    return unique


def system_libraries(name: str) -> list[str]:
    """Absolute paths of the shared library ``lib<name>`` in ``library_dirs()``, first found first."""
    found = []
    for d in library_dirs():
        found += sorted(glob.glob(os.path.join(d, f"lib{name}.so*")), key=len)
    return found


def set_cpu_blas_threads(threads: int) -> bool:
    """Cap the threads of the CBLAS ``load_cpu_blas`` loaded (OpenBLAS or BLIS); False when there
    is none or it has no such call.

    Delete when: ``load_cpu_blas`` is deleted."""
    if CPU_BLAS is None:
        return False
    library = ctypes.CDLL(CPU_BLAS)
    for name in ("openblas_set_num_threads", "bli_thread_set_num_threads"):
        setter = getattr(library, name, None)
        if setter is not None:
            setter(ctypes.c_int(threads))
            return True
    return False


class CpuBlasThreads:
    """The threads the CBLAS behind MLX's CPU matmuls may use, set before each step.

    ``VLLM_METAL_CPU_BLAS_THREADS``: a number fixes it. ``auto``: all of ``cores`` (this rank's
    share of the machine) for a step of fewer than ``BUSY_FROM`` requests, one core fewer from
    there on. With many streams the API server (detokenizing, one SSE stream per client) and the
    engine's own threads need a core as well, and a BLAS call whose worker threads lose their core
    to them waits for those threads: on a 2-core machine, 16 clients served 18.7 tok/s with two
    BLAS threads and 36.5 with one, while one client served 13.1 with two and 9.3 with one
    (docs/benchmarks.md).

    Delete when: ``load_cpu_blas`` is deleted."""

    BUSY_FROM = 8

    def __init__(self, setting: int | str, cores: int):
        self.setting = setting
        self.cores = max(1, cores)
        self.current: int | None = None

    def threads_for(self, requests: int) -> int:
        if self.setting != "auto":
            return int(self.setting)
        return self.cores if requests < self.BUSY_FROM else max(1, self.cores - 1)

    def for_step(self, requests: int) -> None:
        threads = self.threads_for(requests)
        if threads != self.current and set_cpu_blas_threads(threads):
            self.current = threads
