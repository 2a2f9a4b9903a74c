"""Session fixtures shared by the reliability modules; test modules load this file with
``pytest_plugins = ("reliability.fixtures",)`` (and never import it: pytest must import a plugin
itself to rewrite its asserts) so each server starts once per session (per pytest-xdist worker)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import VllmServer

from reliability.http import API_KEY, TINY_NAME
from reliability.tiny import write_tiny_llama

TINY_KV_BLOCKS = 256
TINY_BLOCK_BYTES = 2 * 2 * 2 * 16 * 4 * 16  # layers x (K,V) x kv_heads x head_dim x fp32 x tokens


@pytest.fixture(scope="session")
def tiny_model(models, tmp_path_factory) -> Path:
    """The 2-layer random llama with SmolLM2's tokenizer (see reliability.tiny for why)."""
    return write_tiny_llama(tmp_path_factory.mktemp("reliability") / "tiny-llama", models.hf)


@pytest.fixture(scope="session")
def tiny_server(tiny_model) -> Iterator[VllmServer]:
    """The tiny model behind ``--api-key`` and a served-model name with a slash: the soak, the
    sampling statistics, the disconnects and the per-route API-key checks share it. 256 KV
    blocks, so long prompts in the soak meet preemption too; prefix caching is off so
    ``vllm:kv_cache_usage_perc`` is 0 exactly when no request holds a block."""
    srv = VllmServer(tiny_model, ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "32",
                                  "--kv-cache-memory-bytes", str(TINY_KV_BLOCKS * TINY_BLOCK_BYTES), "--seed", "0",
                                  "--no-enable-prefix-caching", "--api-key", API_KEY,
                                  "--served-model-name", TINY_NAME], name="reliability-tiny")
    yield srv
    srv.stop()
