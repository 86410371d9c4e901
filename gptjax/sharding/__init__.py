"""Sharding: the mesh, the logical-axis rules table, and multi-host start-up."""

from gptjax.sharding.mesh import describe, make_mesh, replicated
from gptjax.sharding.rules import (DEFAULT_RULES, activation_sharding, constrain, logical_sharding,
                                   logical_to_pspec, make_rules)

__all__ = ["DEFAULT_RULES", "activation_sharding", "constrain", "describe", "logical_sharding",
           "logical_to_pspec", "make_mesh", "make_rules", "replicated"]
