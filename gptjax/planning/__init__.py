"""Memory planning (consumes config, sharding, model, training; nothing imports it but the CLI)."""

from gptjax.planning.memory import DEVICE_MEMORY_GB, MemoryPlan, analytic_plan, compiled_memory, memory_of

__all__ = ["DEVICE_MEMORY_GB", "MemoryPlan", "analytic_plan", "compiled_memory", "memory_of"]
