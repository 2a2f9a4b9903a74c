"""The README's "How it works" table names every runtime module of the package."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_lists_every_runtime_module():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## How it works"):]
    table = table[: table.index("\n\n", table.index("| file | role |"))]
    named = set(re.findall(r"`(vllm_metal/[\w/]+(?:\.py)?)`", table))
    named |= {f"vllm_metal/{m}" for m in re.findall(r", `(\w+\.py)`", table)}
    package = ROOT / "vllm_metal"
    missing = []
    for path in sorted(package.iterdir()):
        if path.name.startswith("_") and path.name not in ("__init__.py", "__main__.py"):
            continue
        if path.is_dir() and (path / "__init__.py").exists():
            rel = f"vllm_metal/{path.name}/"
        elif path.suffix == ".py":
            rel = f"vllm_metal/{path.name}"
        else:
            continue
        if rel not in named:
            missing.append(rel)
    assert not missing, f"README's module table lacks {missing}"
