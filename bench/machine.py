"""The machine a benchmark row was measured on: the CPU's model name, the flags that decide kernel speed, the cores.
Every benchmark (and tools/gpu_check.py) records it in every row."""

from __future__ import annotations

import os
from pathlib import Path


def cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    keep = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"cpu": model, "cpu_flags": [f for f in keep if f in flags], "cores": os.cpu_count()}
