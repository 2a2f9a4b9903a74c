"""``--runner pooling``: embeddings from the MLX model, pooled by vLLM's own pooler.

A live ``vllm serve MODEL --runner pooling`` (the line Docker Model Runner's embedding mode
starts) on the bundled model, through the ``openai`` SDK: vectors equal to HF transformers' fp32
last-token hidden state, normalised; the same vectors one at a time, batched and concurrent, and
for an input longer than one step's token budget (chunked prefill).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import VllmServer
from references import hf_embedding, prompt_ids, tokenizer

from vllm_metal.model_runner import StepRecord

TOKENS_PER_STEP = 64


@pytest.fixture(scope="module")
def embedder(models):
    srv = VllmServer(
        models.hf,
        ["--runner", "pooling", "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "8",
         "--max-num-batched-tokens", str(TOKENS_PER_STEP), "--kv-cache-memory-bytes", str(64 * 2**20)],
        env={"VLLM_METAL_DEBUG": "1"}, name="embed",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def inputs(models) -> list[list[int]]:
    """Token ids of 1 to over 300 tokens (the longest spans several steps of 64 tokens)."""
    ids = prompt_ids(models.hf)
    return [ids[0][:1], ids[0], ids[1], ids[3], ids[6]]


def _client(srv: VllmServer):
    import openai

    return openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=300)


def _embed(srv: VllmServer, batch: list[list[int]] | str | list[str]) -> np.ndarray:
    got = _client(srv).embeddings.create(model=srv.model, input=batch)
    return np.array([d.embedding for d in sorted(got.data, key=lambda d: d.index)])


def test_embeddings_match_transformers(embedder, models, inputs):
    got = _embed(embedder, inputs)
    want = np.array([hf_embedding(models.hf, ids) for ids in inputs])
    assert got.shape == want.shape == (len(inputs), 576)
    assert np.abs(got - want).max() < 1e-4
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # the longest input was computed in chunks of the step budget, not in one step
    records = [r for r in map(StepRecord.from_log, embedder.log_path.read_text().splitlines()) if r]
    assert max(len(ids) for ids in inputs) > TOKENS_PER_STEP
    assert records and max(r.tokens for r in records) <= TOKENS_PER_STEP


def test_one_at_a_time_batched_and_concurrent_agree(embedder, inputs):
    batched = _embed(embedder, inputs)
    alone = np.concatenate([_embed(embedder, [ids]) for ids in inputs])
    with ThreadPoolExecutor(len(inputs)) as pool:
        concurrent = np.concatenate(list(pool.map(lambda ids: _embed(embedder, [ids]), inputs)))
    assert np.abs(alone - batched).max() < 1e-5
    assert np.abs(concurrent - batched).max() < 1e-5


def test_text_input_is_tokenized_as_transformers_does(embedder, models):
    text = "Embeddings turn text into vectors."
    ids = tokenizer(models.hf)(text)["input_ids"]
    got = _embed(embedder, text)[0]
    assert np.abs(got - np.array(hf_embedding(models.hf, ids))).max() < 1e-4


def test_generation_routes_are_not_served_by_an_embedding_server(embedder):
    import openai

    with pytest.raises(openai.APIStatusError) as err:
        _client(embedder).completions.create(model=embedder.model, prompt="Hi", max_tokens=4)
    assert 400 <= err.value.status_code < 500


def test_score_is_the_cosine_of_the_embeddings(embedder):
    """vLLM's ``/score`` on an embedding model (bi-encoder): the cosine similarity of the two
    texts' embeddings, as the embeddings route computes them."""
    import httpx

    query, docs = "Where is Paris?", ["Paris is in France.", "Bananas are yellow."]
    body = {"model": embedder.model, "queries": query, "documents": docs}
    response = httpx.post(f"{embedder.base}/score", json=body, timeout=300)
    assert response.status_code == 200, response.text
    scores = [d["score"] for d in sorted(response.json()["data"], key=lambda d: d["index"])]
    vectors = _embed(embedder, [query, *docs])
    assert np.allclose(scores, vectors[1:] @ vectors[0], atol=1e-4)


def test_rerank_orders_documents_by_that_cosine(embedder):
    """``/rerank`` (Jina/Cohere style) on the same bi-encoder: each document's relevance is its
    cosine with the query, highest first."""
    import httpx

    query = "What is the capital of France?"
    docs = ["Paris is the capital of France.", "Bananas are yellow.", "The Eiffel tower is in Paris."]
    body = {"model": embedder.model, "query": query, "documents": docs}
    response = httpx.post(f"{embedder.base}/rerank", json=body, timeout=300)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    vectors = _embed(embedder, [query, *docs])
    cosine = vectors[1:] @ vectors[0]
    assert [r["index"] for r in results] == list(np.argsort(-cosine))
    assert np.allclose([r["relevance_score"] for r in results], np.sort(cosine)[::-1], atol=1e-4)


@pytest.mark.parametrize("mode", ["lasttoken", "mean_tokens"])
def test_qwen3_embedding_style_checkpoint(tmp_path, models, mode):
    """A tiny Qwen3 decoder shipped the way Qwen3-Embedding is (sentence-transformers modules:
    pooling, then normalize), which vLLM reads for its pooler: last-token and mean pooling each
    match HF transformers fp32 on the same weights (last-token across chunked prefill; vLLM
    turns chunking off for mean pooling, so that server gets a whole prompt per step)."""
    import json

    import torch
    from transformers import AutoModel

    from fixtures import tiny

    path = tiny.build(tiny.BY_NAME["qwen3"], tmp_path / "qwen3-embed")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_max_tokens": False,
         "pooling_mode_lasttoken": mode == "lasttoken", "pooling_mode_mean_tokens": mode == "mean_tokens",
         "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False}))
    (path / "2_Normalize").mkdir()
    inputs = [ids[:40] for ids in prompt_ids(models.hf)[:3]] + [prompt_ids(models.hf)[6]]
    with tiny.TRANSFORMERS_LOCK:
        hf = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    want = []
    with torch.no_grad():
        for ids in inputs:
            hidden = hf(torch.tensor([ids])).last_hidden_state[0]
            pooled = hidden[-1] if mode == "lasttoken" else hidden.mean(0)
            want.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    srv = VllmServer(path, ["--runner", "pooling", "--dtype", "float32", "--max-model-len", "512",
                            "--max-num-batched-tokens", str(TOKENS_PER_STEP if mode == "lasttoken" else 512),
                            "--kv-cache-memory-bytes", str(16 * 2**20)], name=f"embed-qwen3-{mode}")
    try:
        got = _embed(srv, inputs)
    finally:
        srv.stop()
    assert np.abs(got - np.array(want)).max() < 1e-4
