"""vLLM's scheduler, plus what it does when a step fails on the device.

A step whose MLX evaluation fails (out of device memory, say) comes back from the runner as a
``FailedStep`` instead of taking the engine down. The scheduler then finishes that step's
requests with ``FinishReason.ERROR`` (the API answers them with a 500 / an error event), and,
since the runner has cleared the K/V pools, preempts every other running request (vLLM
recomputes them from their tokens) and resets the prefix cache, so no request reads K/V that
is gone. The engine keeps serving.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import RequestStatus

logger = init_logger("vllm.metal")


@dataclass
class FailedStep(ModelRunnerOutput):
    """The runner's answer for a step that failed: ``req_ids`` are the step's requests, none
    sampled; ``error`` says what happened."""

    error: str = ""


class _FailedStepHandling:
    def update_from_output(self, scheduler_output, model_runner_output):
        if not isinstance(model_runner_output, FailedStep):
            return super().update_from_output(scheduler_output, model_runner_output)
        # Only requests still running this step's work fail; one preempted by an earlier failure
        # (its output here is stale) is recomputed like the others.
        failed = [r for r in model_runner_output.req_ids
                  if (req := self.requests.get(r)) is not None and req.status == RequestStatus.RUNNING]
        running = len(self.running)
        self.reset_prefix_cache(reset_running_requests=True)  # drops in-flight output, frees blocks
        errored = self.finish_requests(failed, RequestStatus.FINISHED_ERROR)
        logger.error(
            "vllm-metal: %d request(s) finished with an error after a failed step; %d other running "
            "request(s) will be recomputed and the prefix cache was reset. The step failed with: %s",
            len(errored), running - len(errored), model_runner_output.error,
        )
        empty = ModelRunnerOutput(req_ids=model_runner_output.req_ids,
                                  req_id_to_index=model_runner_output.req_id_to_index,
                                  sampled_token_ids=[[] for _ in model_runner_output.req_ids])
        outputs = super().update_from_output(scheduler_output, empty)
        for request in errored:
            eco = outputs.setdefault(request.client_index, EngineCoreOutputs())
            eco.outputs.append(EngineCoreOutput(request_id=request.request_id, new_token_ids=[],
                                                finish_reason=request.get_finished_reason()))
        return outputs


class MetalScheduler(_FailedStepHandling, Scheduler):
    """vLLM's ``Scheduler`` that survives a failed step."""


class MetalAsyncScheduler(_FailedStepHandling, AsyncScheduler):
    """vLLM's ``AsyncScheduler`` that survives a failed step."""
