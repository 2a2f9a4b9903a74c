"""Bad input: 84 malformed or hostile requests over /v1/completions, /v1/chat/completions and
/v1/messages each get a 4xx naming the problem (never a 5xx, never a hang); afterwards the server
answers a normal request exactly as before and its memory is back to its baseline.

Undeclared top-level fields get a 400 naming them (vLLM itself drops them silently); the few
hints whose every value is honoured, provider keys nested in content blocks, and JSON-escaped
control characters (ordinary text) get a 200 and a correct answer.
"""

from __future__ import annotations

import re
from collections import Counter

import httpx
import pytest
from conftest import completion_tokens
from references import tokenizer
from reliability.corpus import CASES, Case
from reliability.procs import tree_rss

MEMORY_SLACK = 32 * 2**20  # allocator slack after parsing six 10 MB bodies (measured: ~7 MiB)
PASS_SLACK = 16 * 2**20  # a second identical pass must not grow it further (measured: ~0)


def _send(server, case: Case) -> httpx.Response:
    return httpx.post(f"{server.url}{case.path}", content=case.payload(server.model),
                      headers={"content-type": case.content_type}, timeout=120)


@pytest.fixture(scope="module")
def corpus_run(server, models):
    """Baseline (greedy answer, memory), two passes of the corpus, then the same again."""
    prompt = tokenizer(models.hf)("The capital of France is")["input_ids"]
    before = completion_tokens(server, prompt, 6)
    log_start = server.log_path.stat().st_size
    rss = [tree_rss(server.proc.pid)]
    passes = []
    for _ in range(2):
        passes.append({case.id: _send(server, case) for case in CASES})
        rss.append(tree_rss(server.proc.pid))
    after = completion_tokens(server, prompt, 6)
    log = server.log_path.read_text(errors="replace")[log_start:]
    return {"before": before, "after": after, "rss": rss, "passes": passes, "log": log}


def test_corpus_is_large_and_covers_every_endpoint():
    assert len(CASES) >= 40
    assert Counter(c.path for c in CASES).keys() == {"/completions", "/chat/completions", "/messages"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_request_gets_4xx_with_useful_message(corpus_run, case):
    for responses in corpus_run["passes"]:
        r = responses[case.id]
        assert r.status_code == case.status, (r.status_code, r.text[:500])
        if case.needle is not None:
            assert case.needle.lower() in r.text.lower(), r.text[:500]


def test_server_unharmed_after_corpus(corpus_run, server):
    """Same greedy tokens as before the corpus, no engine error, memory back to baseline."""
    assert corpus_run["after"] == corpus_run["before"]
    log = corpus_run["log"]  # vLLM logs a traceback for some 4xx (anthropic router): not a failure
    assert "EngineDeadError" not in log and not re.search(r'HTTP/1\.1" 5\d\d', log)
    assert not [line for line in log.splitlines() if "EngineCore" in line and " ERROR " in line]
    base, first, second = corpus_run["rss"]
    print(f"server tree RSS: baseline {base / 2**20:.0f} MiB, after pass 1 {first / 2**20:.0f} MiB, "
          f"after pass 2 {second / 2**20:.0f} MiB")
    assert second - base < MEMORY_SLACK, (base, first, second)
    assert second - first < PASS_SLACK, (base, first, second)
    assert httpx.get(f"{server.base}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("extra", [
    pytest.param({"prompt_cache_key": "user-7", "metadata": {"run": "a"}}, id="honoured-hints"),
    pytest.param({"prompt": "The capital of France is\u0000\u0001\u001b[31m"}, id="escaped-control-chars"),
])
def test_tolerated_inputs_answer_normally(server, extra):
    body = {"model": server.model, "prompt": "The capital of France is", "max_tokens": 3,
            "temperature": 0, "ignore_eos": True, **extra}
    r = server.post("/completions", body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def test_sdks_see_unknown_fields_refused_and_hints_honoured(server):
    """Through the real SDKs: an undeclared field raises BadRequestError naming it; store=false,
    safety_identifier and Anthropic's cache_control (top level and on a content block) answer."""
    import anthropic
    import openai

    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0)
    chat = {"model": server.model, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 2}
    with pytest.raises(openai.BadRequestError, match="verbosity"):
        client.chat.completions.create(**chat, verbosity="low")
    ok = client.chat.completions.create(**chat, store=False, safety_identifier="u1")
    assert ok.usage.completion_tokens >= 1

    claude = anthropic.Anthropic(base_url=server.base, api_key="x", max_retries=0)
    message = {"model": server.model, "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Say hi", "cache_control": {"type": "ephemeral"}}]}]}
    with pytest.raises(anthropic.BadRequestError, match="service_tier"):
        claude.messages.create(**message, service_tier="auto")
    ok = claude.messages.create(**message, extra_body={"cache_control": {"type": "ephemeral"}},
                                metadata={"user_id": "u1"})
    assert ok.usage.output_tokens >= 1
