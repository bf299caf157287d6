"""Graph passes: each has one job and returns a PassResult."""

from qdq.passes.base import Pass, PassResult, run_passes

__all__ = ["Pass", "PassResult", "run_passes"]
