"""``--reasoning-parser`` end to end, on a checkpoint whose tokenizer has ``<think>``/``</think>``.

The checkpoint is the bundled model with two unused special tokens renamed ``<think>`` (15) and
``</think>`` (16), neither special any more (as in Qwen3's tokenizer), and the embedding rows (tied with
the LM head) of ``</think>`` and of the token the model greedily writes fourth swapped: the model
then writes ``</think>`` there and continues as before, so a greedy chat holds reasoning before
it and content after it. The tokens must equal HF transformers' on the same files, and vLLM's
``deepseek_r1`` parser must split the text at ``</think>``, streamed and not.
"""

from __future__ import annotations

import json
import shutil

import openai
import pytest
from conftest import VllmServer
from references import hf_greedy, tokenizer

THINK, END_THINK = 15, 16
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def thinking_model(models, tmp_path_factory):
    """(checkpoint dir, prompt ids): the bundled model taught to write ``</think>`` fourth."""
    import mlx.core as mx

    tok = tokenizer(models.hf)
    text = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]  # as vLLM's chat route encodes it
    plain = hf_greedy(models.hf, prompt, MAX_TOKENS)
    swap = next(t for t in plain[3:] if t not in prompt and t > END_THINK)
    out = tmp_path_factory.mktemp("thinking")
    for f in models.hf.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    spec = json.loads((out / "tokenizer.json").read_text())
    for token_id, name in ((THINK, "<think>"), (END_THINK, "</think>")):
        added = next(a for a in spec["added_tokens"] if a["id"] == token_id)
        spec["model"]["vocab"].pop(added["content"], None)
        spec["model"]["vocab"][name] = token_id
        added.update(content=name, special=False)
    (out / "tokenizer.json").write_text(json.dumps(spec))
    weights = mx.load(str(out / "model.safetensors"))
    for name, w in weights.items():
        if w.ndim == 2 and w.shape[0] > swap and name.endswith(("embed_tokens.weight", "lm_head.weight")):
            rows = mx.arange(w.shape[0])
            rows = mx.where(rows == swap, END_THINK, mx.where(rows == END_THINK, swap, rows))
            weights[name] = w[rows]
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    return out, prompt


@pytest.fixture(scope="module")
def reasoning_server(thinking_model):
    srv = VllmServer(thinking_model[0], ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4",
                                         "--reasoning-parser", "deepseek_r1"], name="reasoning")
    yield srv
    srv.stop()


def test_reasoning_and_content_split_at_end_think(reasoning_server, thinking_model):
    server = reasoning_server
    path, prompt = thinking_model
    want = hf_greedy(path, prompt, MAX_TOKENS)
    assert END_THINK in want[1:-1], want
    cut = want.index(END_THINK)
    tok = tokenizer(path)
    reasoning, content = (tok.decode(ids, skip_special_tokens=True) for ids in (want[:cut], want[cut + 1:]))
    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=300)
    args = {"model": server.model, "messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0}

    r = client.chat.completions.create(**args, extra_body={"return_token_ids": True, "ignore_eos": True})
    choice = r.choices[0]
    assert choice.model_extra["token_ids"] == want
    assert choice.message.model_extra["reasoning"] == reasoning
    assert choice.message.content == content

    got = {"reasoning": "", "content": ""}
    for chunk in client.chat.completions.create(**args, stream=True, extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            got["reasoning"] += (c.delta.model_extra or {}).get("reasoning") or ""
            got["content"] += c.delta.content or ""
    assert got == {"reasoning": reasoning, "content": content}
