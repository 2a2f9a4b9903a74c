"""The OpenAI-compatible and Anthropic-compatible APIs of a live `vllm serve` on the plugin, through
the real `openai` and `anthropic` SDKs: completions, chat, streaming, logprobs, seeds, every sampling
parameter (each test fails if the parameter were ignored), and 4xx answers to invalid parameters.

The machine is slow (a few tokens a second), so generations are short and independent requests of
one test are sent together (the server batches them)."""

from __future__ import annotations

import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import anthropic
import openai
import pytest
from conftest import completion_tokens
from references import tokenizer

STORY = "Once upon a time, in a small village by the sea,"
CHAT_MSG = [{"role": "user", "content": "What is the capital of France?"}]
REPEAT = "a b a b a b a b"  # greedy continues " a b a b ..." for ever


def _parallel(fn, items):
    items = list(items)
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tok(models):
    return tokenizer(models.hf)


@pytest.fixture(scope="module")
def story_greedy(oai, server):
    """Greedy 16-token continuation of STORY (EOS ignored), text and ids."""
    r = oai.completions.create(model=server.model, prompt=STORY, max_tokens=16, temperature=0,
                               extra_body={"ignore_eos": True, "return_token_ids": True})
    return r


@pytest.fixture(scope="module")
def chat_greedy(oai, server):
    return oai.chat.completions.create(model=server.model, messages=CHAT_MSG, max_tokens=12,
                                       temperature=0)


# --------------------------------------------------------------------------------------------
# openai SDK


def test_completions(story_greedy, server, tok):
    r = story_greedy
    assert r.object == "text_completion" and r.model == server.model
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.finish_reason == "length"
    assert len(c.token_ids) == 16 and r.usage.completion_tokens == 16
    assert r.usage.prompt_tokens == len(tok(STORY)["input_ids"])
    assert c.text and c.text == tok.decode(c.token_ids)


def test_chat_completions_use_chat_template(chat_greedy, server, tok):
    r = chat_greedy
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant"
    assert c.message.content and c.finish_reason in ("stop", "length")
    templated = tok.apply_chat_template(CHAT_MSG, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    assert r.usage.prompt_tokens == len(templated)
    assert 0 < r.usage.completion_tokens <= 12
    # the same ids through the raw completions endpoint give the same greedy text
    ids = completion_tokens(server, list(map(int, templated)), r.usage.completion_tokens)
    assert tok.decode(ids, skip_special_tokens=True) == c.message.content


def test_streaming_chat_matches_non_streaming(oai, server, chat_greedy):
    stream = oai.chat.completions.create(model=server.model, messages=CHAT_MSG, max_tokens=12,
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                parts.append(ch.delta.content)
            if ch.finish_reason:
                finish = ch.finish_reason
    assert len(parts) > 1, "expected incremental deltas"
    assert "".join(parts) == chat_greedy.choices[0].message.content
    assert finish == chat_greedy.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == chat_greedy.usage.completion_tokens


def test_completion_logprobs(oai, server, story_greedy):
    r = oai.completions.create(model=server.model, prompt=STORY, max_tokens=6, temperature=0,
                               logprobs=3,
                               extra_body={"ignore_eos": True, "return_token_ids": True,
                                           "return_tokens_as_token_ids": True})
    c = r.choices[0]
    assert c.token_ids == story_greedy.choices[0].token_ids[:6]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for i, (token, chosen, top) in enumerate(
            zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True)):
        assert token == f"token_id:{c.token_ids[i]}"
        assert len(top) == 3, top
        assert all(v <= 0 and math.isfinite(v) for v in top.values()), top
        assert chosen <= 0
        # greedy: the chosen token is the most likely one
        assert token in top and math.isclose(chosen, max(top.values()), abs_tol=1e-5), (token, top)
        assert max(top, key=top.get) == token
    # log-probabilities of distinct tokens: their probabilities sum to at most 1
    assert all(sum(math.exp(v) for v in top.values()) <= 1 + 1e-4 for top in lp.top_logprobs)


def test_chat_logprobs(oai, server, chat_greedy):
    r = oai.chat.completions.create(model=server.model, messages=CHAT_MSG, max_tokens=5,
                                    temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert chat_greedy.choices[0].message.content.startswith(r.choices[0].message.content)
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2
        assert all(x.logprob <= 0 for x in t.top_logprobs)
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert math.isclose(t.logprob, t.top_logprobs[0].logprob, abs_tol=1e-5)


def test_n_2_with_seed(oai, server):
    r = oai.completions.create(model=server.model, prompt=STORY, max_tokens=12, temperature=0.8,
                               seed=7, n=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    texts = [c.text for c in r.choices]
    assert all(texts) and r.usage.completion_tokens == 24
    # vLLM gives the children seeds 7 and 8: they sample differently
    assert texts[0] != texts[1]


def test_seed_reproducible(oai, server):
    def gen(seed):
        r = oai.completions.create(model=server.model, prompt=STORY, max_tokens=16,
                                   temperature=1.0, seed=seed, extra_body={"ignore_eos": True})
        return r.choices[0].text

    # same seed twice (in one batch, and once more afterwards), and two other seeds
    a, b, *others = _parallel(gen, [1234, 1234, 1, 2])
    assert a == b
    assert gen(1234) == a
    assert any(o != a for o in others), (a, others)


# --------------------------------------------------------------------------------------------
# anthropic SDK (it appends /v1/messages to the base URL itself)


@pytest.fixture(scope="module")
def claude(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base, api_key="x", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def claude_greedy(claude, server):
    # this SDK version has no `temperature` argument; the server still reads it from the body
    return claude.messages.create(model=server.model, max_tokens=10, messages=CHAT_MSG,
                                  extra_body={"temperature": 0})


def test_anthropic_messages(claude_greedy, server, chat_greedy):
    m = claude_greedy
    assert m.type == "message" and m.role == "assistant"
    assert len(m.content) == 1 and m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.input_tokens == chat_greedy.usage.prompt_tokens
    assert 0 < m.usage.output_tokens <= 10
    # same chat template and greedy sampling as the OpenAI chat endpoint
    assert chat_greedy.choices[0].message.content.startswith(m.content[0].text)


def test_anthropic_streaming_matches_non_streaming(claude, server, claude_greedy):
    with claude.messages.stream(model=server.model, max_tokens=10, messages=CHAT_MSG,
                                extra_body={"temperature": 0}) as s:
        deltas = list(s.text_stream)
        final = s.get_final_message()
    assert len(deltas) > 1
    assert "".join(deltas) == claude_greedy.content[0].text
    assert final.content[0].text == claude_greedy.content[0].text
    assert final.stop_reason == claude_greedy.stop_reason
    assert final.usage.output_tokens == claude_greedy.usage.output_tokens


# --------------------------------------------------------------------------------------------
# sampling parameters: each test fails if the parameter were ignored


def test_top_k_top_p_min_p_reduce_to_greedy(server, tok):
    ids = tok(STORY)["input_ids"]
    seed = 11
    variants = [
        {"temperature": 0},                                    # greedy baseline
        {"temperature": 1.0, "seed": seed},                    # control: plain sampling
        {"temperature": 1.0, "seed": seed, "top_k": 1},
        {"temperature": 1.0, "seed": seed, "top_p": 1e-6},
        {"temperature": 1.0, "seed": seed, "min_p": 1.0},
    ]
    greedy, control, top_k, top_p, min_p = _parallel(
        lambda extra: completion_tokens(server, ids, 12, **extra), variants)
    assert control != greedy, "control sample equals greedy: the test would prove nothing"
    assert top_k == greedy, "top_k=1 ignored"
    assert top_p == greedy, "top_p=1e-6 ignored"
    assert min_p == greedy, "min_p=1.0 ignored"


def test_logit_bias_forces_token(server, tok, story_greedy):
    (zebra,) = tok.encode(" zebra")
    assert zebra not in story_greedy.choices[0].token_ids
    ids = completion_tokens(server, tok(STORY)["input_ids"], 4, logit_bias={str(zebra): 100})
    assert ids == [zebra] * 4


def test_min_tokens_suppresses_eos(oai, server):
    msgs = [{"role": "user", "content": "Say only the word yes."}]

    def chat(extra):
        return oai.chat.completions.create(model=server.model, messages=msgs, max_tokens=16,
                                           temperature=0, extra_body=extra)

    free, forced = _parallel(chat, [{}, {"min_tokens": 14}])
    assert free.choices[0].finish_reason == "stop"
    assert free.usage.completion_tokens < 14, free.choices[0].message.content
    assert forced.usage.completion_tokens >= 14, forced.choices[0].message.content
    assert forced.choices[0].message.content.startswith(free.choices[0].message.content)


@pytest.mark.parametrize("penalties", [
    pytest.param({"frequency_penalty": 2.0, "presence_penalty": 0, "repetition_penalty": 1.0},
                 id="frequency"),
    pytest.param({"frequency_penalty": 0, "presence_penalty": 2.0, "repetition_penalty": 1.0},
                 id="presence"),
    pytest.param({"frequency_penalty": 0, "presence_penalty": 0, "repetition_penalty": 2.0},
                 id="repetition"),
])
def test_penalty_reduces_repetition(server, tok, penalties, _repeat_greedy):
    ids = completion_tokens(server, tok(REPEAT)["input_ids"], 12, **penalties)
    base_top, base_count = Counter(_repeat_greedy).most_common(1)[0]
    assert Counter(ids)[base_top] < base_count, (tok.decode(_repeat_greedy), tok.decode(ids))
    assert Counter(ids).most_common(1)[0][1] < base_count, (tok.decode(_repeat_greedy),
                                                             tok.decode(ids))


@pytest.fixture(scope="module")
def _repeat_greedy(server, tok):
    ids = completion_tokens(server, tok(REPEAT)["input_ids"], 12)
    assert Counter(ids).most_common(1)[0][1] >= 4, tok.decode(ids)  # greedy really repeats
    return ids


def test_stop_string(oai, server, story_greedy):
    text = story_greedy.choices[0].text
    words = text.split()
    assert len(words) >= 4, text
    stop = words[len(words) // 2]
    expected = text[: text.index(stop)]
    r = oai.completions.create(model=server.model, prompt=STORY, max_tokens=16, temperature=0,
                               stop=[stop], extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == expected and stop not in c.text
    assert r.usage.completion_tokens < 16


def test_prompt_logprobs(oai, server, tok, story_greedy):
    prompt = tok(STORY)["input_ids"]
    first = story_greedy.choices[0].token_ids[0]
    # the prompt plus its greedy next token, teacher-forced
    r = oai.completions.create(model=server.model, prompt=prompt + [first], max_tokens=1,
                               temperature=0, logprobs=1,
                               extra_body={"prompt_logprobs": 1, "ignore_eos": True})
    plp = r.choices[0].prompt_logprobs
    assert plp is not None and len(plp) == len(prompt) + 1
    assert plp[0] is None
    for pos, entry in enumerate(plp[1:], start=1):
        token = (prompt + [first])[pos]
        assert str(token) in entry, (pos, entry)
        assert 1 <= len(entry) <= 2
        assert all(e["logprob"] <= 0 for e in entry.values())
        ranks = {e["rank"] for e in entry.values()}
        assert 1 in ranks
    # the last prompt position must agree with how the same token scores as a generated token
    gen = oai.completions.create(model=server.model, prompt=prompt, max_tokens=1, temperature=0,
                                 logprobs=1, extra_body={"ignore_eos": True})
    last = plp[-1][str(first)]
    assert last["rank"] == 1
    assert math.isclose(last["logprob"], gen.choices[0].logprobs.token_logprobs[0], abs_tol=1e-3)


def test_max_tokens_respected(oai, server):
    r = oai.completions.create(model=server.model, prompt=STORY, max_tokens=3, temperature=0,
                               extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


# --------------------------------------------------------------------------------------------
# invalid parameters: 4xx (never 5xx) naming the parameter


@pytest.mark.parametrize("body,param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -5}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"n": 0}, "n must"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 100000}, "max_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt_logprobs": 100}, "prompt_logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"model": "no-such-model"}, "no-such-model"),
])
def test_invalid_completion_params_are_4xx(server, body, param):
    r = server.post("/completions", {"model": server.model, "prompt": "hi", "max_tokens": 2, **body},
                    timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    if body.get("model"):
        assert r.status_code == 404
    msg = r.json()["error"]["message"]
    assert param in msg, msg


@pytest.mark.parametrize("body,param", [
    ({"logprobs": True, "top_logprobs": 100}, "logprobs"),
    ({"top_logprobs": 2}, "logprobs"),
    ({"temperature": -1}, "temperature"),
    ({"model": "no-such-model"}, "no-such-model"),
])
def test_invalid_chat_params_are_4xx(server, body, param):
    r = server.post("/chat/completions", {"model": server.model, "max_tokens": 2,
                                          "messages": [{"role": "user", "content": "hi"}], **body},
                    timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert param in r.json()["error"]["message"], r.text


def test_server_still_healthy_after_errors(server, oai):
    r = oai.completions.create(model=server.model, prompt="Hello", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1
    log = server.log_tail(400)
    assert "Traceback" not in log and "EngineDeadError" not in log, log
