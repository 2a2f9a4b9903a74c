"""Tensor parallelism: vLLM's workers joined in one MLX process group, each holding a shard.

vLLM's executor starts one ``MetalWorker`` per rank (``--tensor-parallel-size N``: its
multiprocessing executor on one machine, Ray across machines) and keeps the control plane: it
broadcasts each ``SchedulerOutput`` to every rank and returns rank 0's ``ModelRunnerOutput``.
Every rank runs the same step on its shard; mlx-lm's sharded layers sum the partial results
with ``mx.distributed.all_sum``, so every rank computes the same logits and, seeded alike
(vLLM's ``--seed``, 0 unless given), samples the same tokens.

The MLX group is planned once, in the process that builds vLLM's config
(``plan``: backend and addresses, carried to the workers in the config), and joined by each
worker (``join``). Sharding is mlx-lm's own (``Model.shard``), applied before the weights are
read, so a rank reads and holds only its share.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from dataclasses import asdict, dataclass

import mlx.core as mx
import mlx.nn as nn

from vllm_metal.attention import LayerSpec

BACKENDS = ("ring", "nccl", "jaccl")
CONFIG_KEY = "vllm_metal_distributed"  # the plan's key in vLLM's ``additional_config``


class DistributedError(ValueError):
    """The parallel configuration cannot run; the message names the setting to change."""


@dataclass(frozen=True)
class Plan:
    """How the ranks find each other: what ``join`` needs, identical in every rank."""

    backend: str
    world_size: int
    hosts: list[list[str]] | None = None  # ring: each rank's listening addresses (MLX_HOSTFILE)
    coordinator: str | None = None  # nccl: rank 0's ip:port

    def to_config(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, value: dict) -> Plan:
        return cls(**value)


def resolve_backend(setting: str) -> str:
    """VLLM_METAL_DISTRIBUTED_BACKEND's backend; ``auto``: NCCL where MLX computes on NVIDIA GPUs,
    MLX's TCP ring elsewhere (CPU, Metal)."""
    if setting != "auto":
        return setting
    return "nccl" if _computes_on_cuda() else "ring"


def _computes_on_cuda() -> bool:
    from vllm_metal.device import configured_device, gpu_backend

    return configured_device() == "gpu" and gpu_backend() == "cuda"


def plan(world_size: int, backend: str, hostfile: str | None) -> Plan:
    """The group's plan. Ring: the ranks' addresses from ``hostfile`` (VLLM_METAL_HOSTFILE, an
    MLX ring hostfile: one list of ``ip:port`` per rank, in vLLM's rank order), else every rank
    on this machine at a free loopback port. NCCL: rank 0's address from NCCL_HOST_IP/NCCL_PORT,
    else a free loopback port. JACCL: MLX's own variables, which must be set."""
    if backend == "ring":
        hosts = read_hostfile(hostfile, world_size) if hostfile else [[f"127.0.0.1:{p}"] for p in free_ports(world_size)]
        return Plan(backend, world_size, hosts=hosts)
    if backend == "nccl":
        host = os.environ.get("NCCL_HOST_IP", "127.0.0.1")
        port = os.environ.get("NCCL_PORT") or str(free_ports(1)[0])
        return Plan(backend, world_size, coordinator=f"{host}:{port}")
    missing = [v for v in ("MLX_JACCL_COORDINATOR", "MLX_IBV_DEVICES") if not os.environ.get(v)]
    if missing:
        raise DistributedError(
            f"VLLM_METAL_DISTRIBUTED_BACKEND=jaccl needs MLX's JACCL variables {' and '.join(missing)} "
            "(see MLX's distributed docs; `mlx.distributed_config --backend jaccl` writes them), or "
            "use the ring backend.")
    return Plan(backend, world_size)


def read_hostfile(path: str, world_size: int) -> list[list[str]]:
    """An MLX ring hostfile: a JSON list with one entry per rank, each a list of ``ip:port``."""
    try:
        with open(path) as f:
            hosts = json.load(f)
    except (OSError, ValueError) as exc:
        raise DistributedError(f"VLLM_METAL_HOSTFILE={path}: cannot read it as JSON ({exc}).") from exc
    if (not isinstance(hosts, list) or not all(isinstance(h, list) and h for h in hosts)
            or not all(isinstance(a, str) and a.rpartition(":")[2].isdigit() for h in hosts for a in h)):
        raise DistributedError(f"VLLM_METAL_HOSTFILE={path}: expected a JSON list with one list of "
                               '"ip:port" strings per rank, e.g. [["10.0.0.1:5000"], ["10.0.0.2:5000"]].')
    if len(hosts) != world_size:
        raise DistributedError(f"VLLM_METAL_HOSTFILE={path} lists {len(hosts)} ranks but "
                               f"--tensor-parallel-size is {world_size}; list one entry per rank.")
    return hosts


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on the loopback interface now."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def join(plan: Plan, rank: int, local_rank: int) -> mx.distributed.Group:
    """Join the group as ``rank``: set the variables MLX's backend reads, then initialize it."""
    os.environ["MLX_RANK"] = str(rank)
    hostfile = None
    if plan.backend == "ring":
        fd, hostfile = tempfile.mkstemp(prefix="vllm-metal-ring-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(plan.hosts, f)
        os.environ["MLX_HOSTFILE"] = hostfile
    elif plan.backend == "nccl":
        host, _, port = plan.coordinator.rpartition(":")
        os.environ.update(NCCL_HOST_IP=host, NCCL_PORT=port, MLX_WORLD_SIZE=str(plan.world_size))
    try:
        group = mx.distributed.init(strict=True, backend=plan.backend)
    except Exception as exc:  # noqa: BLE001 - MLX raises RuntimeError or ValueError by backend
        raise DistributedError(f"vllm-metal: rank {rank} could not join MLX's {plan.backend} group: {exc}") from exc
    finally:
        if hostfile is not None:  # read by init
            os.remove(hostfile)
    if group.size() != plan.world_size or group.rank() != rank:
        raise DistributedError(f"vllm-metal: MLX's {plan.backend} group gave rank {group.rank()} of "
                               f"{group.size()}, expected rank {rank} of {plan.world_size}.")
    return group


def shard_problem(model: nn.Module, specs: list[LayerSpec], size: int) -> str | None:
    """Why mlx-lm's ``model`` cannot be split ``size`` ways, or None."""
    module = type(model).__module__
    if not hasattr(model, "shard"):
        return f"{module} has no tensor-parallel sharding in mlx-lm (no Model.shard)"
    if any(s.state is not None for s in specs):
        return f"{module} has recurrent-state layers, whose state the plugin does not split across ranks"
    for i, s in enumerate(specs):
        if s.state is None and (s.q_heads % size or s.kv_heads % size):
            return (f"layer {i} has {s.q_heads} query and {s.kv_heads} key/value heads, which do not "
                    f"split evenly {size} ways")
    return None


def shard(model: nn.Module, specs: list[LayerSpec], group: mx.distributed.Group) -> None:
    """Split ``model`` (lazy, weights not yet read) across ``group`` with mlx-lm's ``shard``."""
    problem = shard_problem(model, specs, group.size())
    if problem is not None:
        raise DistributedError(f"vllm-metal: --tensor-parallel-size {group.size()}: {problem}.")
    try:
        model.shard(group)
    except (ValueError, RuntimeError) as exc:  # a weight that does not split evenly
        raise DistributedError(f"vllm-metal: --tensor-parallel-size {group.size()}: mlx-lm could not "
                               f"shard {type(model).__module__}: {exc}") from exc


def pin_gpu(local_rank: int) -> None:
    """Give an NCCL rank its own GPU: the ``local_rank``-th of CUDA_VISIBLE_DEVICES (of all GPUs
    when unset), as MLX's NCCL backend expects. MLX reads the variable when it first uses CUDA."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if visible and local_rank >= len(visible):
        raise DistributedError(f"vllm-metal: rank {local_rank} on this machine has no GPU: "
                               f"CUDA_VISIBLE_DEVICES lists {len(visible)}; lower --tensor-parallel-size.")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[local_rank] if visible else str(local_rank)


def refusals(vllm_config, metal_envs) -> list[str]:
    """What of a ``--tensor-parallel-size`` > 1 configuration the plugin cannot run, one reason each."""
    parallel = vllm_config.parallel_config
    refuse = []
    if parallel.distributed_executor_backend != "mp":
        refuse.append(f"--distributed-executor-backend {parallel.distributed_executor_backend} with "
                      "--tensor-parallel-size > 1: the ranks run under vLLM's multiprocessing executor "
                      "(mp, its default; --nnodes/--node-rank/--master-addr across machines)")
    if parallel.prefill_context_parallel_size > 1 or parallel.decode_context_parallel_size > 1:
        refuse.append("context parallelism (--prefill/--decode-context-parallel-size) is not supported")
    if vllm_config.lora_config is not None:
        refuse.append("LoRA (--enable-lora) with --tensor-parallel-size > 1: adapters are not sharded")
    spec = vllm_config.speculative_config
    if spec is not None and spec.method == "draft_model":
        refuse.append("a draft model (--speculative-config) with --tensor-parallel-size > 1: it is not "
                      "sharded; n-gram drafts work")
    if not metal_envs.use_paged_attention:
        refuse.append("--tensor-parallel-size > 1 needs the paged KV cache (VLLM_METAL_USE_PAGED_ATTENTION=1)")
    backend = resolve_backend(metal_envs.distributed_backend)
    if backend == "nccl" and not _computes_on_cuda():
        refuse.append("VLLM_METAL_DISTRIBUTED_BACKEND=nccl needs MLX computing on NVIDIA GPUs (mlx[cuda13]); "
                      "use ring")
    if parallel.nnodes > 1 and backend == "ring" and not metal_envs.hostfile:
        refuse.append("ranks on several machines (--nnodes > 1) find each other through VLLM_METAL_HOSTFILE "
                      "(an MLX ring hostfile, one entry per rank); set it on every machine")
    if parallel.nnodes > 1 and backend == "nccl" and not (os.environ.get("NCCL_HOST_IP") and os.environ.get("NCCL_PORT")):
        refuse.append("NCCL ranks on several machines (--nnodes > 1) meet at NCCL_HOST_IP:NCCL_PORT (the first "
                      "machine's address and a free port); set both on every machine")
    return refuse
