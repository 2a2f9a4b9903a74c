#!/usr/bin/env bash
# Run the whole test suite (installs the stack on first use). Extra args go to pytest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$("$root/scripts/bootstrap.sh")
export PATH="$venv/bin:$PATH" HF_HUB_OFFLINE=1
cd "$root"
ruff check vllm_metal tests benchmarks scripts
python -m fixtures.bundled_model >/dev/null   # build/reuse the bundled model once
# Two workers, each test file on one (its module-scoped servers start once): a served step keeps
# about one core busy, so on a 2-core machine the ~67 minutes of tests take ~34 on two workers.
# `-n 0` runs it in one process.
python -m pytest -n 2 --dist loadfile "$@"
