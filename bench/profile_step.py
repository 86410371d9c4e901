"""Where a gptjax train step spends its time: one step under ``jax.profiler``, op time summed by HLO kind.

    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python bench/profile_step.py gpt2ish bfloat16
    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python bench/profile_step.py gpt2ish-2k float32 --attention dense

Configs are the training benchmark's (``bench/train_bench.py``). Each XLA thunk in the trace is mapped to its
HLO instruction; a fusion is labelled by the ops inside it ("dot" if it holds one, else "reduce", else the
sorted elementwise ops), and the kinds are printed by summed time, then the slowest matmuls with their shapes.
XLA:CPU runs independent thunks concurrently, so the sum can exceed the step's wall time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

SKIP = {"parameter", "bitcast", "constant", "broadcast", "get-tuple-element", "tuple"}
INSTR = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w\-]*)\(")


def hlo_kinds(hlo: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (kind, shape) for every instruction of the compiled module."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        head = re.match(r"^%?([\w.\-]+) .*\{$", line) or re.match(r"^ENTRY %?([\w.\-]+)", line)
        if head:
            current = head.group(1)
            comps[current] = []
        elif current:
            comps[current].append(line)
    kinds = {}
    for lines in comps.values():
        for line in lines:
            m = INSTR.match(line)
            if not m:
                continue
            name, shape, op = m.groups()
            called = re.search(r"calls=%?([\w.\-]+)", line)
            kind = op
            if called and called.group(1) in comps:
                ops = {i.group(3) for i in map(INSTR.match, comps[called.group(1)]) if i} - SKIP
                kind = "dot" if "dot" in ops else "reduce" if "reduce" in ops else "+".join(sorted(ops))[:70] or op
            kinds[name] = (kind, shape)
    return kinds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("dtype", choices=["float32", "bfloat16"])
    p.add_argument("--attention", default="auto")
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args()

    import jax
    import numpy as np

    sys.path.insert(0, str(Path(__file__).parent))
    from train_bench import CONFIGS, run_config

    from gptjax.sharding.mesh import make_mesh
    from gptjax.training.program import Program

    c = CONFIGS[a.config]
    cfg = run_config(c, a.dtype, 3, a.attention)
    prog = Program(cfg, make_mesh(cfg.mesh))
    state = prog.init(jax.random.key(0))
    data = np.random.default_rng(0).integers(0, c["vocab_size"], (c["batch_size"], c["seq_len"] + 1)).astype(np.int32)
    batch = prog.global_batch({"inputs": data[:, :-1], "targets": data[:, 1:],
                               "loss_mask": np.ones((c["batch_size"], c["seq_len"]), np.float32)})
    state, m = prog.train_step(state, batch)  # compile
    jax.block_until_ready(m)
    t = time.perf_counter()
    state, m = prog.train_step(state, batch)
    jax.block_until_ready(m)
    print(f"step {time.perf_counter() - t:.2f} s")
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        state, m = prog.train_step(state, batch)
        jax.block_until_ready(m)
        jax.profiler.stop_trace()
        trace = json.load(gzip.open(sorted(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True))[-1]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            total[e["name"]] += e["dur"]
            count[e["name"]] += 1
    kinds = hlo_kinds(prog.train_step.lower(state, batch).compile().as_text())
    if not any(name in kinds for name in total):
        raise SystemExit("no XLA ops in the trace: set XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true")
    by_kind, n_kind = collections.Counter(), collections.Counter()
    for name, us in total.items():
        if name in kinds:
            by_kind[kinds[name][0]] += us
            n_kind[kinds[name][0]] += count[name]
    print("op time by kind (ms, calls):")
    for kind, us in by_kind.most_common(a.top):
        print(f"{us / 1e3:10.1f} {n_kind[kind]:6d}  {kind}")
    dots = sorted(((us, name) for name, us in total.items() if kinds.get(name, ("",))[0] == "dot"), reverse=True)
    print("slowest matmuls (ms, output shape):")
    for us, name in dots[:a.top]:
        print(f"{us / 1e3:10.1f}  {kinds[name][1]}")


if __name__ == "__main__":
    main()
