"""One-off investigations behind docs/benchmarks.md and docs/reliability.md (see benchmarks/README.md)."""
