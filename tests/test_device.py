"""How a step is handed to the device: ``EvalTimer``'s one-step-ahead launch and MLX's in-place writes.

MLX writes into an array in place only when nothing else holds its buffer, and work still running
holds every array it reads. A step launched while the previous one runs would therefore copy the
K/V pools it writes; with VLLM_METAL_KV_IN_PLACE on (the default) the launch first waits for the
device, and the write lands in the pool's own buffer.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from vllm_metal.device import EvalTimer


def _address(a: mx.array) -> int:
    view = np.asarray(a)  # zero-copy view of the evaluated array; dropped before the next write
    return view.ctypes.data


def _write_while_a_reader_runs(in_place: bool) -> bool:
    """Launch a slow 'step' that reads a pool, then the next step's slice write into that pool;
    True when the write kept the pool's buffer."""
    pool = mx.zeros((1 << 20,), dtype=mx.float32)
    big = mx.random.normal((1024, 1024))
    mx.eval(pool, big)
    before = _address(pool)
    busy = big
    for _ in range(12):  # long enough to be running when the write is launched
        busy = busy @ big
    timer = EvalTimer(wait=False, in_place=in_place)
    timer((busy[0, 0] * pool).sum())  # reads the pool after the chain
    pool[0:4] = mx.ones((4,))
    timer(pool)
    mx.synchronize()
    assert pool[:5].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    return _address(pool) == before


def test_a_launch_waits_for_the_running_step_so_the_write_is_in_place():
    assert _write_while_a_reader_runs(in_place=True)
    # without waiting, MLX copies the pool (what VLLM_METAL_KV_IN_PLACE=1 avoids)
    assert not _write_while_a_reader_runs(in_place=False)
