"""The benchmark harness (benchmarks/compare.py) end to end: real servers, real requests.

``--quick`` is the CI smoke test of the published benchmark: it must start every requested system
(or say why it could not), drive each one over its OpenAI-compatible API and write consistent
JSON, markdown and plots. No speed is asserted: the numbers depend on the machine.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUICK_TOKENS = 16  # compare.QUICK: max_tokens and sweep output length
QUICK_LEVELS = ("1", "2")


def run_compare(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], str, str]:
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compare", "--quick", "--out", str(out),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert out.exists(), log
    return proc.returncode, json.loads(out.read_text()), out.with_suffix(".md").read_text(), log


def table_rows(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("|")]


def positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_run_measures_every_system(tmp_path: Path) -> None:
    rc, res, md, log = run_compare(tmp_path)
    assert rc == 0, log
    systems = res["systems"]
    assert list(systems) == ["vllm-metal", "mlx-lm", "llama.cpp"], log
    # The plugin and mlx-lm are installed with the test extra; they must produce numbers.
    assert systems["vllm-metal"]["status"] == "ok", systems["vllm-metal"].get("reason")
    assert systems["mlx-lm"]["status"] == "ok", systems["mlx-lm"].get("reason")
    measured = 0
    for name, s in systems.items():
        if s["status"] != "ok":  # llama.cpp without llama-cpp-python[server]: reported, not dropped
            assert s["status"] == "unavailable" and s["reason"].startswith("not installed"), s
            assert f"| {name} | unavailable: not installed" in md
            continue
        measured += 1
        assert positive(s["startup_s"]), s
        assert not s.get("protocol_error") and not s.get("sweep_error"), s
        proto = s["protocol"][str(QUICK_TOKENS)]
        assert len(proto["runs"]) == 1
        # EOS suppressed through logit_bias: every server generates exactly max_tokens.
        assert [r["completion_tokens"] for r in proto["runs"]] == [QUICK_TOKENS], (name, proto)
        assert all(positive(proto[k]) for k in ("mean", "min", "max")), proto
        for level in QUICK_LEVELS:
            m = s["sweep"][level]
            assert m["failed"] == 0 and m["completed"] == m["num_prompts"] > 0, (name, m)
            for key in ("output_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                        "duration"):
                assert positive(m[key]), (name, level, key, m)
            if m["tokens_counted_by"] == ["usage"]:
                assert m["total_output_tokens"] == m["num_prompts"] * QUICK_TOKENS, (name, m)
            else:  # llama.cpp's server streams no usage: its text is re-tokenized
                assert positive(m["total_output_tokens"]), (name, m)
        assert s["command"] and s["version"], s
    assert measured >= 2
    meta = res["meta"]
    assert meta["mode"] == "quick" and meta["command"].startswith("python -m benchmarks.compare")
    assert meta["machine"]["cpu_count"] >= 1 and meta["versions"]["vllm"] != "not installed"
    # Markdown: the seed's table shape (llama.cpp first, ratio columns) and the sweep tables.
    assert "| max_tokens | llama.cpp | vllm-metal | mlx-lm | vllm-metal / llama.cpp |" in md
    assert f"| {QUICK_TOKENS} | " in md
    for title in ("Aggregate output tok/s", "TTFT ms, mean / p99", "TPOT ms, mean"):
        assert f"**{title}" in md
    assert "| clients | vllm-metal | mlx-lm | llama.cpp |" in md
    assert md.count("\n| 1 | ") == 3 and md.count("\n| 2 | ") == 3
    for img in (f"bench-throughput-{meta['device']}.png", f"bench-ttft-{meta['device']}.png"):
        path = tmp_path / "img" / img
        assert path.read_bytes().startswith(b"\x89PNG"), path
        assert f"](img/{img})" in md

    # --merge (one system per run, for machines that limit a command's duration) gives back the
    # same report from the run split in two.
    parts = []
    for i, names in enumerate((["vllm-metal"], ["mlx-lm", "llama.cpp"])):
        part = tmp_path / f"part{i}.json"
        part.write_text(json.dumps(res | {"systems": {n: systems[n] for n in names}}))
        parts.append(str(part))
    merged = tmp_path / "merged" / "results.json"
    subprocess.run([sys.executable, "-m", "benchmarks.compare", "--merge", *parts, "--out",
                    str(merged)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert json.loads(merged.read_text())["systems"] == systems
    assert table_rows(merged.with_suffix(".md").read_text()) == table_rows(md)
    # One part alone (what each `--systems X` run reports) has no reference system: its ratio
    # cells say n/a instead of the report failing.
    alone = tmp_path / "alone" / "results.json"
    subprocess.run([sys.executable, "-m", "benchmarks.compare", "--merge", parts[0], "--out", str(alone)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    alone_md = alone.with_suffix(".md").read_text()
    assert "| clients | vllm-metal |" in alone_md and "(n/a)" in alone_md, alone_md


def test_systems_that_cannot_run_are_reported(tmp_path: Path) -> None:
    """A checkpoint a server cannot load is 'could not start' with its log; a missing one, why."""
    from fixtures.bundled_model import ensure_default_models

    broken = tmp_path / "not-a-model"
    broken.mkdir()
    rc, res, md, log = run_compare(
        tmp_path, "--systems", "mlx-lm", "llama.cpp", "--model-hf", str(ensure_default_models().hf),
        "--model-mlx", str(broken), "--model-gguf", str(tmp_path / "missing.gguf"))
    assert rc == 1, log  # nothing was measured
    mlx, llama = res["systems"]["mlx-lm"], res["systems"]["llama.cpp"]
    assert mlx["status"] == "failed" and mlx["reason"].startswith("could not start: "), mlx
    assert "not-a-model" in mlx["reason"]  # the server's own log tail names what it failed on
    assert llama["status"] == "unavailable" and "missing.gguf" in llama["reason"], llama
    assert "| mlx-lm | failed: could not start" in md and "could not start" in md
    assert "<summary>mlx-lm: reason</summary>" in md


def test_paths_take_turns_over_the_same_prompts() -> None:
    """paged_vs_mlx_cache's rounds: every prompt once, in order; no round below 4 x concurrency
    (it would not run at full concurrency) unless there is only one; at most --rounds."""
    from benchmarks.investigations.paged_vs_mlx_cache import rounds

    prompts = [f"p{i}" for i in range(100)]
    for concurrency, max_rounds, sizes in ((1, 10, [10] * 10), (8, 10, [33, 34, 33]), (32, 10, [100]),
                                           (1, 3, [33, 34, 33]), (200, 10, [100])):
        chunks = rounds(prompts, concurrency, max_rounds)
        assert [len(c) for c in chunks] == sizes, (concurrency, max_rounds)
        assert [p for c in chunks for p in c] == prompts
