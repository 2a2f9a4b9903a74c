"""Results -> markdown tables (seed's shape, ratios) and PNG plots; docs/benchmarks.md update."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from benchmarks.prompts import SWEEP_PROMPTS
from benchmarks.sweep import num_prompts_for


def markers(device: str) -> tuple[str, str]:
    """One results section per device in docs/benchmarks.md, so CPU and GPU runs coexist."""
    return (f"<!-- benchmark-results:{device}:start (written by python -m benchmarks.compare "
            f"--docs) -->", f"<!-- benchmark-results:{device}:end -->")

PROTOCOL_REF = "llama.cpp"
SWEEP_REF = "mlx-lm"


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _ratio(x: Any, ref: Any) -> str:
    a, b = _num(x), _num(ref)
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


def _absent(sys_res: dict[str, Any], phase: str) -> str:
    """Cell text for a system without numbers in ``phase``."""
    if sys_res["status"] == "unavailable":
        return "not installed" if sys_res["reason"].startswith("not installed") else "unavailable"
    if sys_res["status"] == "failed":
        return "could not start"
    return "error" if sys_res.get(f"{phase}_error") else "n/a"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def protocol_table(res: dict[str, Any]) -> list[str]:
    systems = res["systems"]
    names = sorted(systems, key=lambda n: n != PROTOCOL_REF)  # the reference first, as the seed
    others = [n for n in names if n != PROTOCOL_REF]
    header = ["max_tokens", *names, *(f"{n} / {PROTOCOL_REF}" for n in others)]
    rows = []
    for n in res["meta"]["params"]["max_tokens"]:
        cells = [str(n)]
        for name in names:
            p = (systems[name].get("protocol") or {}).get(str(n))
            cells.append(f"{p['mean']:.1f} ({p['min']:.1f}-{p['max']:.1f})" if p
                         else _absent(systems[name], "protocol"))
        ref = (systems.get(PROTOCOL_REF, {}).get("protocol") or {}).get(str(n), {}).get("mean")
        for name in others:
            mean = (systems[name].get("protocol") or {}).get(str(n), {}).get("mean")
            cells.append(_ratio(mean, ref))
        rows.append(cells)
    return _table(header, rows)


def sweep_tables(res: dict[str, Any]) -> list[str]:
    systems = res["systems"]
    names = list(systems)
    levels = res["meta"]["params"]["concurrency"]

    def metric(name: str, c: int, key: str) -> Any:  # None also for a system not in this run
        return ((systems.get(name, {}).get("sweep") or {}).get(str(c)) or {}).get(key)

    def table(title: str, fmt) -> list[str]:
        rows = []
        for c in levels:
            row = [str(c)]
            for name in names:
                if metric(name, c, "completed") is None:
                    row.append(_absent(systems[name], "sweep"))
                    continue
                failed = metric(name, c, "failed")
                row.append(fmt(name, c) + (f" ({failed} failed)" if failed else ""))
            rows.append(row)
        return [f"**{title}**", "", *_table(["clients", *names], rows), ""]

    def with_ratio(key: str):
        def fmt(name: str, c: int) -> str:
            v = _num(metric(name, c, key))
            cell = f"{v:.1f}" if v is not None else "n/a"
            return cell if name == SWEEP_REF else f"{cell} ({_ratio(v, metric(SWEEP_REF, c, key))})"
        return fmt

    def ttft(name: str, c: int) -> str:
        mean, p99 = _num(metric(name, c, "mean_ttft_ms")), _num(metric(name, c, "p99_ttft_ms"))
        return f"{mean:.0f} / {p99:.0f}" if mean is not None and p99 is not None else "n/a"

    return [*table(f"Aggregate output tok/s (ratio to {SWEEP_REF})", with_ratio("output_throughput")),
            *table("TTFT ms, mean / p99", ttft),
            *table(f"TPOT ms, mean (ratio to {SWEEP_REF}; lower is better)",
                   with_ratio("mean_tpot_ms"))]


def plot(res: dict[str, Any], img_dir: Path) -> list[Path]:
    """Throughput and TTFT vs concurrency, one line per system with numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    levels = res["meta"]["params"]["concurrency"]
    paths = []
    for key, ylabel, fname in (("output_throughput", "aggregate output tokens/s", "throughput"),
                               ("mean_ttft_ms", "mean TTFT (ms)", "ttft")):
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
        for name, s in res["systems"].items():
            pts = [(c, _num(((s.get("sweep") or {}).get(str(c)) or {}).get(key))) for c in levels]
            pts = [(c, v) for c, v in pts if v is not None]
            if pts:
                ax.plot([c for c, _ in pts], [v for _, v in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        if key == "mean_ttft_ms":
            ax.set_yscale("log")  # TTFT spans orders of magnitude between systems and levels
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs concurrency ({res['meta']['device']})")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        path = img_dir / f"bench-{fname}-{res['meta']['device']}.png"
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def markdown(res: dict[str, Any], images: list[Path], md_dir: Path) -> str:
    meta = res["meta"]
    m, p = meta["machine"], meta["params"]
    gpu = "; ".join(m["gpus"]) or "none"
    lines = [
        f"#### Run of {meta['date']}", "",
        f"- Machine: {m['cpu']}, {m['cpu_count']} cores, {m['memory_gib']} GiB RAM, GPU: {gpu}; "
        f"{m['os']}; load average at start {m['load_avg_at_start']}",
        f"- Device: `--device {meta['device']}` (MLX backend available: {m['mlx_backend']})",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- Model: {meta['model']['name']}; every system gets the same chat requests (greedy, "
        "EOS suppressed through `logit_bias`, see Method)",
        f"- Command: `{meta['command']}`",
        f"- Mode: {meta['mode']}; load generator for the sweep: {meta['loadgen']}", "",
        "**Systems**", "",
        *_table(["system", "status", "checkpoint", "format", "version", "startup s"],
                [[n, s["status"] + (f": {s['reason'].splitlines()[0]}" if s.get("reason") else ""),
                  f"`{s['checkpoint']}`", s["format"], s["version"],
                  f"{s['startup_s']:.1f}" if _num(s.get("startup_s")) else "-"]
                 for n, s in res["systems"].items()]), "",
    ]
    if p.get("protocol"):
        lines += [f"**Single stream, tokens/s (wall clock): mean (min-max) of {p['prompts']} prompts "
                  f"x {p['runs']} runs; ratio = system mean / {PROTOCOL_REF} mean**", "",
                  *protocol_table(res), ""]
    if p.get("sweep"):
        lines += [f"**Concurrency sweep**: {p['sweep_output_len']} output tokens per request, "
                  "requests per level (clients: requests) " + ", ".join(
                      f"{c}: {num_prompts_for(c, p['num_prompts'], SWEEP_PROMPTS)}"
                      for c in p["concurrency"]), "",
                  *sweep_tables(res)]
        lines += [f"![{img.stem}]({Path(os.path.relpath(img, md_dir)).as_posix()})" for img in images]
        lines.append("")
    for name, s in res["systems"].items():
        for key in ("reason", "protocol_error", "sweep_error"):
            if s.get(key) and s["status"] != "unavailable":
                lines += [f"<details><summary>{name}: {key.replace('_', ' ')}</summary>", "",
                          "```", s[key].strip(), "```", "", "</details>", ""]
    return "\n".join(lines)


def write_between_markers(doc: Path, body: str, device: str) -> None:
    """Replace this device's section of ``doc`` (append its markers if missing)."""
    start, end = markers(device)
    text = doc.read_text() if doc.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n{start}\n{body}\n{end}\n"
    doc.write_text(text)
