"""flover_jax: temporal fusion (Flover) of many generation requests as pure JAX functions."""

from flover_jax.engine import Engine, RunResult, TimedRequest
from flover_jax.request import FinishReason, RequestOutput, StreamDelta
from flover_jax.sampling_params import SamplingParams

__all__ = [
    "Engine",
    "FinishReason",
    "RequestOutput",
    "RunResult",
    "SamplingParams",
    "StreamDelta",
    "TimedRequest",
]
