"""Where Q/DQ goes: rules with reasons, gathered into an immutable plan before anything is inserted."""

from qdq.placement.plan import Decision, QuantInput, QuantPlan
from qdq.placement.planner import PlacementOptions, plan_quantization

__all__ = ["Decision", "PlacementOptions", "QuantInput", "QuantPlan", "plan_quantization"]
