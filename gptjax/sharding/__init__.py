"""Sharding: the mesh, the logical-axis rules table, and multi-host start-up. Imports only ``config``."""

from gptjax.sharding.mesh import describe, make_mesh, replicated, single_device_mesh
from gptjax.sharding.rules import (DEFAULT_RULES, activation_sharding, constrain, logical_sharding,
                                   logical_to_pspec, make_rules, tree_shardings)

__all__ = ["DEFAULT_RULES", "activation_sharding", "constrain", "describe", "logical_sharding",
           "logical_to_pspec", "make_mesh", "make_rules", "replicated", "single_device_mesh", "tree_shardings"]
