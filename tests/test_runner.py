"""The runner's contract, without a server: SchedulerOutput in, ModelRunnerOutput out.

Hand-built scheduler outputs walk one request through chunked prefill, decode, preemption and
resume on fresh blocks, and a prefix-cache hit (a new request whose first blocks are already
computed); every sampled token must equal mlx-lm's greedy continuation. One test keeps vLLM's
async-scheduling order (step N+1 runs before step N's output is read).
"""

from __future__ import annotations

import pytest
from conftest import metal_worker, runner_launch, runner_step
from references import mlx_greedy, prompt_ids
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData
from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput

BLOCK = 16


@pytest.fixture(scope="module")
def runner(models):
    worker = metal_worker(models.hf, dtype="float32", max_model_len=512, num_blocks=64, block_size=BLOCK)
    yield worker
    worker.shutdown()


def _cached(req_id, computed, new_blocks=None, resumed=False, all_tokens=None, num_output=0):
    return CachedRequestData(
        req_ids=[req_id], resumed_req_ids={req_id} if resumed else set(), new_token_ids=[[]],
        all_token_ids={req_id: all_tokens} if all_tokens is not None else {},
        new_block_ids=[(new_blocks,) if new_blocks is not None else None],
        num_computed_tokens=[computed], num_output_tokens=[num_output],
    )


def _new(req_id, ids, blocks, computed=0, **sampling):
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, **sampling)
    return NewRequestData(req_id=req_id, prompt_token_ids=ids, mm_features=[], sampling_params=params,
                          pooling_params=None, block_ids=(blocks,), num_computed_tokens=computed,
                          lora_request=None)


def test_chunked_prefill_decode_preempt_resume(runner, models):
    ids = prompt_ids(models.hf)[3]  # 16 tokens
    want = mlx_greedy(models.mlx, ids, 6)
    n = len(ids)
    # prefill in two chunks: the first yields no token
    out = runner_step(runner, new=[_new("a", ids, [1, 2])], scheduled={"a": 10})
    assert out.req_ids == ["a"] and out.sampled_token_ids == [[]]
    out = runner_step(runner, cached=_cached("a", 10), scheduled={"a": n - 10})
    got = out.sampled_token_ids[0]
    # two decode steps
    for k in range(2):
        out = runner_step(runner, cached=_cached("a", n + k, num_output=k + 1), scheduled={"a": 1})
        got += out.sampled_token_ids[0]
    assert got == want[:3]
    # preempted (not scheduled), then resumed on different blocks: recompute everything
    all_tokens = ids + got
    out = runner_step(runner, cached=_cached("a", 0, new_blocks=[5, 6, 7], resumed=True,
                                       all_tokens=all_tokens, num_output=3),
                scheduled={"a": len(all_tokens)})
    got += out.sampled_token_ids[0]
    for k in range(2):
        computed = len(all_tokens) + k
        out = runner_step(runner, cached=_cached("a", computed, num_output=4 + k), scheduled={"a": 1})
        got += out.sampled_token_ids[0]
    assert got == want
    out = runner_step(runner, finished=["a"], scheduled={})
    assert out.req_ids == []


def test_prefix_hit_and_batched_requests(runner, models):
    long_ids = prompt_ids(models.hf)[6][:40]
    short_ids = prompt_ids(models.hf)[0]
    want_long = mlx_greedy(models.mlx, long_ids, 3)
    want_short = mlx_greedy(models.mlx, short_ids, 3)
    # "p" computes the long prompt into blocks 10-12
    out = runner_step(runner, new=[_new("p", long_ids, [10, 11, 12])], scheduled={"p": 40})
    assert out.sampled_token_ids == [[want_long[0]]]
    # "q": same prompt, first two blocks (32 tokens) already cached -> only 8 tokens computed;
    # scheduled in one batch with a fresh short request and p's decode step
    out = runner_step(
        runner,
        new=[_new("q", long_ids, [10, 11, 13], computed=32), _new("s", short_ids, [14])],
        cached=_cached("p", 40, num_output=1),
        scheduled={"p": 1, "q": 8, "s": len(short_ids)},
    )
    by_id = dict(zip(out.req_ids, out.sampled_token_ids, strict=True))
    assert by_id["q"] == [want_long[0]]
    assert by_id["s"] == [want_short[0]]
    assert by_id["p"] == [want_long[1]]
    runner_step(runner, finished=["p", "q", "s"], scheduled={})


def test_one_sequence_on_scattered_blocks(runner, models):
    """vLLM hands a request blocks in any order (freed blocks come back last-in first-out; a prefix
    hit starts wherever the prefix was computed), and the runner moves one sequence's blocks into
    one run of the pool, moving the blocks in the way with their K/V. A request prefilling and
    decoding alone on blocks 40, 43 and then 3 moves two blocks of a finished request (41, 42);
    a request reusing those two blocks (a prefix hit) then runs batched and alone: every token
    equals mlx-lm's greedy continuation."""
    ids = prompt_ids(models.hf)[6][:30]
    cached_ids = prompt_ids(models.hf)[7]  # 39 tokens: blocks 41, 42 full, 43 partly
    short_ids = prompt_ids(models.hf)[0]
    want, want_cached = mlx_greedy(models.mlx, ids, 5), mlx_greedy(models.mlx, cached_ids, 3)
    out = runner_step(runner, new=[_new("p", cached_ids, [41, 42, 43])], scheduled={"p": 39})
    assert out.sampled_token_ids == [want_cached[:1]]
    runner_step(runner, finished=["p"], scheduled={})  # its full blocks stay in vLLM's prefix cache
    out = runner_step(runner, new=[_new("r", ids, [40, 43])], scheduled={"r": 30})
    got = out.sampled_token_ids[0]
    for k in range(3):  # positions 30, 31, 32; position 32 opens the request's third block
        new_blocks = [3] if 30 + k == 32 else None
        out = runner_step(runner, cached=_cached("r", 30 + k, new_blocks=new_blocks, num_output=k + 1),
                    scheduled={"r": 1})
        got += out.sampled_token_ids[0]
    assert got == want[:4]
    out = runner_step(
        runner,
        new=[_new("h", cached_ids, [41, 42, 12], computed=32), _new("s", short_ids, [13])],
        cached=_cached("r", 33, num_output=4),
        scheduled={"r": 1, "h": 7, "s": len(short_ids)},
    )
    by_id = dict(zip(out.req_ids, out.sampled_token_ids, strict=True))
    assert by_id["r"] == [want[4]]
    assert by_id["s"] == [mlx_greedy(models.mlx, short_ids, 1)[0]]
    got = by_id["h"]
    for k in range(2):  # h alone: its blocks are placed consecutively in turn
        out = runner_step(runner, cached=_cached("h", 39 + k, num_output=k + 1), scheduled={"h": 1},
                    finished=["r", "s"] if k == 0 else ())
        got += out.sampled_token_ids[0]
    assert got == want_cached
    runner_step(runner, finished=["h"], scheduled={})


@pytest.fixture(scope="module")
def ahead_runner(models):
    """A runner with one step ahead on (VLLM_METAL_ONE_STEP_AHEAD=1; ``auto`` leaves it off on MLX's CPU)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_METAL_ONE_STEP_AHEAD", "1")
        worker = metal_worker(models.hf, dtype="float32", max_model_len=512, num_blocks=64, block_size=BLOCK)
    yield worker
    worker.shutdown()


def test_next_step_runs_before_this_steps_output_is_read(ahead_runner, models):
    """Under vLLM's async scheduling the engine executes step N+1 before it reads step N's output,
    and the runner is not told step N's token: greedy steps come back as
    ``AsyncModelRunnerOutput`` (sampled on the device; the next step takes the token from there),
    a step with a request that wants logprobs is sampled on the host, and the tokens are
    mlx-lm's either way."""
    ids, other = prompt_ids(models.hf)[3], prompt_ids(models.hf)[0]
    n, m = len(ids), len(other)
    want, want_other = mlx_greedy(models.mlx, ids, 6), mlx_greedy(models.mlx, other, 3)
    launched = [runner_launch(ahead_runner, new=[_new("a", ids, [1, 2])], scheduled={"a": n})]
    for k in range(3):  # decode positions n .. n+2, each launched before the previous is read
        launched.append(runner_launch(ahead_runner, cached=_cached("a", n + k, num_output=k + 1), scheduled={"a": 1}))
        assert isinstance(launched[-2], AsyncModelRunnerOutput)
    # "b" wants logprobs: that step is sampled by vLLM's Sampler once the device tokens are in
    both = runner_launch(ahead_runner, new=[_new("b", other, [20], logprobs=1)], cached=_cached("a", n + 3, num_output=4),
                         scheduled={"a": 1, "b": m})
    assert isinstance(both, ModelRunnerOutput)
    outs = [o.get_output() for o in launched] + [both]
    got = [o.sampled_token_ids[o.req_id_to_index["a"]][0] for o in outs]
    b_row = both.req_id_to_index["b"]
    assert both.sampled_token_ids[b_row] == want_other[:1]
    assert both.logprobs.sampled_token_ranks[b_row] == 1  # the greedy token is the most likely
    # back on the device once "b" is gone; its step reads a's host-sampled token
    last = runner_launch(ahead_runner, cached=_cached("a", n + 4, num_output=5), scheduled={"a": 1}, finished=["b"])
    assert isinstance(last, AsyncModelRunnerOutput)
    got += last.get_output().sampled_token_ids[0]
    assert got == want
    runner_step(ahead_runner, finished=["a"], scheduled={})
