"""Memory planning (consumes config, sharding, model, training; nothing imports it but the CLI)."""

from gptjax.planning.memory import DEVICE_MEMORY_GB, MemoryPlan, analytic_plan, compiled_memory, memory_of
from gptjax.planning.report import memory_report

__all__ = ["DEVICE_MEMORY_GB", "MemoryPlan", "analytic_plan", "compiled_memory", "memory_of", "memory_report"]
