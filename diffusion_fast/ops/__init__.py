"""The three hot-path ops. Each checks its input, then dispatches to a backend (see :mod:`.registry`)."""

from .attention import attention
from .group_norm import group_norm
from .registry import BackendUnavailable, status
from .sampler_step import sampler_step

__all__ = ["attention", "group_norm", "sampler_step", "BackendUnavailable", "status"]
