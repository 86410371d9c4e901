"""Where a gptjax train step spends its time: one step under ``jax.profiler``, op time summed by HLO kind.

    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python bench/profile_step.py gpt2ish bfloat16
    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python bench/profile_step.py gpt2ish-2k float32 --attention dense

Configs are the training benchmark's (``bench/train_bench.py``). Each XLA thunk in the trace is mapped to its
HLO instruction; a fusion is labelled by the ops inside it ("dot" if it holds one, else "reduce", else the
sorted elementwise ops), and the kinds are printed by summed time. Then the matmuls, grouped by operand shapes
(with layouts and contracting dims): calls, op time, GFLOP (from the HLO) and the rate. Their GFLOP add up to what
the step computes, so a matmul recomputed by remat or a wasted one shows. XLA:CPU runs independent thunks
concurrently, so the summed op time can exceed the step's wall time (the last line says by how much) and the rate
of an op that ran beside another understates the kernel's own.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import re
import tempfile
import time

from gptjax.config import DTYPE_NAMES

SKIP = {"parameter", "bitcast", "constant", "broadcast", "get-tuple-element", "tuple"}
INSTR = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w\-]*)\(")


def _dims(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def hlo_ops(hlo: str) -> dict[str, tuple[str, str, int, str]]:
    """Instruction name -> (kind, shape, matmul FLOPs, matmul signature) for every instruction of the compiled
    module; a fusion's kind, FLOPs and signature are those of the ops inside it (FLOPs 0 without a dot)."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        head = re.match(r"^%?([\w.\-]+) .*\{$", line) or re.match(r"^ENTRY %?([\w.\-]+)", line)
        if head:
            current = head.group(1)
            comps[current] = []
        elif current:
            comps[current].append(line)

    def shapes_in(lines: list[str]) -> dict[str, str]:
        return {m.group(1): m.group(2) for m in map(INSTR.match, lines) if m}

    def dot_flops(line: str, shapes: dict[str, str]) -> tuple[int, str]:
        """FLOPs of one dot instruction (2 x output size x contracted size) and its operands' signature."""
        lhs, rhs = re.findall(r"%([\w.\-]+)", line.split(" dot(", 1)[1].split(")", 1)[0])[:2]
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
        out = INSTR.match(line).group(2)
        lhs_dims, out_dims = (_dims(re.search(r"\[([\d,]*)\]", t).group(1)) for t in (shapes[lhs], out))
        k = math.prod(lhs_dims[i] for i in _dims(contracting))
        return 2 * math.prod(out_dims) * k, f"{shapes[lhs]} x {shapes[rhs]} c{{{contracting}}} -> {out}"

    fused = {c.group(1) for lines in comps.values() for line in lines if " fusion(" in line
             for c in [re.search(r"calls=%?([\w.\-]+)", line)] if c}
    ops = {}
    for computation, lines in comps.items():
        if computation in fused:  # a fusion's body: its ops run inside the fusion's thunk, counted there
            continue
        shapes = shapes_in(lines)
        for line in lines:
            m = INSTR.match(line)
            if not m:
                continue
            name, shape, op = m.groups()
            kind, flops, signature = op, 0, ""
            if op == "dot":
                flops, signature = dot_flops(line, shapes)
            called = re.search(r"calls=%?([\w.\-]+)", line)
            body = comps.get(called.group(1)) if called else None
            if body is not None:
                inner = [(i.group(3), b) for b in body if (i := INSTR.match(b))]
                kinds = {o for o, _ in inner} - SKIP
                kind = "dot" if "dot" in kinds else "reduce" if "reduce" in kinds else "+".join(sorted(kinds))[:70] or op
                dots = [b for o, b in inner if o == "dot"]
                if op == "fusion" and dots:
                    flops, signature = dot_flops(dots[0], shapes_in(body))
            ops[name] = (kind, shape, flops, signature)
    return ops


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: the time at least one op was running."""
    busy, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return busy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("dtype", choices=DTYPE_NAMES)
    p.add_argument("--attention", default="auto")
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args()

    import jax
    import numpy as np

    from train_bench import CONFIGS, run_config  # a sibling: bench/ is the script's directory

    from gptjax.sharding import make_mesh
    from gptjax.training import Program

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
    ops = hlo_ops(prog.train_step.lower(state, batch).compile().as_text())
    spans = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
             if e.get("ph") == "X" and "dur" in e and e["name"] in ops]
    if not spans:
        raise SystemExit("no XLA ops in the trace: set XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true")
    by_kind, n_kind = collections.Counter(), collections.Counter()
    dots: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])  # calls, us, flops
    for start, stop, name in spans:
        kind, _, flops, signature = ops[name]
        by_kind[kind] += stop - start
        n_kind[kind] += 1
        if flops:
            dots[signature][0] += 1
            dots[signature][1] += stop - start
            dots[signature][2] += flops
    print("op time by kind (ms, calls):")
    for kind, us in by_kind.most_common(a.top):
        print(f"{us / 1e3:10.1f} {n_kind[kind]:6d}  {kind}")
    gflop, dot_us = sum(d[2] for d in dots.values()) / 1e9, sum(d[1] for d in dots.values())
    print(f"matmuls: {gflop:.1f} GFLOP in {dot_us / 1e3:.0f} ms of op time ({gflop / dot_us * 1e6:.0f} GFLOP/s); "
          "by operands (ms, calls, GFLOP, GFLOP/s):")
    for signature, (calls, us, flops) in sorted(dots.items(), key=lambda kv: -kv[1][1])[:a.top]:
        print(f"{us / 1e3:10.1f} {calls:6d} {flops / 1e9:7.1f} {flops / us / 1e3:6.0f}  {signature}")
    summed = sum(stop - start for start, stop, _ in spans)
    print(f"op time {summed / 1e3:.0f} ms summed, {busy_time([(t0, t1) for t0, t1, _ in spans]) / 1e3:.0f} ms with "
          f"at least one op running, {(max(t for _, t, _ in spans) - min(t for t, _, _ in spans)) / 1e3:.0f} ms "
          "first to last")


if __name__ == "__main__":
    main()
