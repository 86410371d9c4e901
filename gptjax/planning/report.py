"""The memory report of a run config on a mesh, whole: the analytic per-device rows, the axes that shard nothing,
XLA's compiled per-device peak at reduced depths extrapolated to the full depth, and the verdict. ``gptjax-plan``
prints it; the compute plan's compiled check reads it (before, the report was assembled in the CLI and the compute
plan ran the CLI in a subprocess to get it).

The compiled check compiles the train step on ``data x fsdp x context x tensor`` simulated CPU devices, which
XLA fixes when it starts: it runs in a child process (``python -m gptjax.planning.report``) started with that
device count. The verdict is the analytic figure's (the module docstring of ``gptjax/cli/plan.py`` says why): on
XLA:CPU a bf16 step keeps float32 buffers, so the compiled figure overstates an accelerator's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from gptjax.config import RunConfig
from gptjax.model import count_params
from gptjax.planning.memory import analytic_plan, compiled_memory, idle_axes

GB = 1e9
_PREFIX = "AOT "


def at_depth(cfg: RunConfig, n_layers: int) -> RunConfig:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layers=n_layers))


def compiled_at_depths(cfg: RunConfig, sizes: Mapping[str, int], depths: Sequence[int]) -> dict[int, dict]:
    """XLA's per-device memory of the compiled train step at each depth, on ``sizes``' devices (a child process)."""
    import tempfile

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                         f"--xla_force_host_platform_device_count={math.prod(sizes.values())}".strip())
    with tempfile.TemporaryDirectory(prefix="gptjax-plan-") as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(cfg.to_json())
        r = subprocess.run([sys.executable, "-m", "gptjax.planning.report", str(path), *map(str, depths)], env=env,
                           capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(_PREFIX)]
    if r.returncode or not lines:
        raise RuntimeError(f"the compiled memory check failed:\n{r.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(lines[-1][len(_PREFIX):]).items()}


def memory_report(cfg: RunConfig, sizes: Mapping[str, int], device_gb: float,
                  compile_layers: Sequence[int] | None = None) -> dict:
    """The report of ``cfg`` on a mesh of axis ``sizes`` against a device of ``device_gb``: ``params``,
    ``analytic_bytes`` (rows, ``total`` among them), ``attention``, ``warnings``; with ``compile_layers``, ``aot``
    (per depth: analytic and compiled bytes) and ``compiled_full_depth_peak`` (the compiled peak extrapolated
    linearly in depth from the shallowest and deepest compiled, or scaled from one); ``fits_analytic``,
    ``fits_compiled`` and the verdict ``fits`` (the analytic one)."""
    plan = analytic_plan(cfg, sizes)
    result = {"params": count_params(cfg.model), "mesh": dict(sizes), "seq": cfg.train.seq_len,
              "attention": plan.attention, "analytic_bytes": dict(plan.rows()), "device_gb": device_gb,
              "warnings": idle_axes(cfg, sizes)}
    if compile_layers:
        aot = compiled_at_depths(cfg, sizes, sorted(set(compile_layers)))
        depths = sorted(aot)
        result["aot"] = [{"layers": d, "analytic": analytic_plan(at_depth(cfg, d), sizes).total, **aot[d]}
                         for d in depths]
        d1, d2 = depths[0], depths[-1]
        if d2 > d1:
            full = aot[d1]["peak"] + (aot[d2]["peak"] - aot[d1]["peak"]) / (d2 - d1) * (cfg.model.n_layers - d1)
        else:
            full = aot[d1]["peak"] * cfg.model.n_layers / d1
        result["compiled_full_depth_peak"] = int(full)
    result["fits_analytic"] = plan.total <= device_gb * GB
    if "compiled_full_depth_peak" in result:
        result["fits_compiled"] = result["compiled_full_depth_peak"] <= device_gb * GB
    result["fits"] = result["fits_analytic"]  # the one verdict (module docstring)
    result["verdict_from"] = "analytic"
    return result


def _child(config: str, depths: list[str]) -> None:
    import jax

    from gptjax.sharding.mesh import make_mesh

    cfg = RunConfig.from_dict(json.loads(Path(config).read_text()))
    out = {}
    for d in map(int, depths):
        at = at_depth(cfg, d)
        out[d] = compiled_memory(at, make_mesh(at.mesh, jax.devices()))
    print(_PREFIX + json.dumps(out), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2:])
