#!/usr/bin/env python3
"""The GPU check: gptjax on one real accelerator in one short, rerunnable run (about 4 minutes on an H100 / H200).

    tools/fetch_wheels                                   # here: the wheels the GPU image lacks, into .whl/
    python3 tools/gpu_check.py --wheels .whl --out $OUT/gpu-2026-11-26.jsonl     # on the GPU machine
    python3 tools/gpu_check.py --cpu --out /tmp/cpu.jsonl                        # the same code, tiny, on CPU
    python3 tools/gpu_check.py --only attention,train-gpt2                       # some sections

``--wheels DIR`` installs the project's missing dependencies over the image's packages without touching them
(``pip install --no-index --no-deps --target``, then ``PYTHONPATH``); the project itself runs from this checkout.
Sections, each in its own process (a clean device, its own peak memory, a time limit), in this order:

* ``kernels``: the device's two ceilings measured here (a bf16 matmul with float32 accumulation, random data;
  a device copy), then every attention kernel (cuDNN through ``jax.nn.dot_product_attention``, blockwise, dense)
  on causal, banded and segment-masked GQA inputs in float32 and bfloat16, forward and the three gradients,
  against a float32 dense reference on the host CPU at ``highest`` matmul precision: relative L2 error within
  ``TOLERANCE`` (float32 allows TF32 matmuls; bf16 operands). A kernel that cannot express a mask or dtype runs
  the fallback the model would, and the row says which ran.
* ``equivalence``: four training steps of the tiny model (float32, ``highest`` precision) on the device and, in
  a parallel process, on the CPU: losses, gradient norms and the parameters' update agree within tolerance.
* ``train-gpt2`` / ``train-llama``: training throughput in bf16 (float32 master weights and Adam) of a GPT-2-small
  shape (124M, seq 1024; vocabulary padded to 50304 as nanoGPT / nanochat do) and a TinyLlama-1.1B shape (GQA
  32/4, RoPE, SwiGLU, seq 2048). The batch is the largest the memory planner (``analytic_plan``) fits in the
  device's allocator limit, capped at ``TOKENS_CAP`` tokens; the row has tokens/s, MFU against the datasheet's
  dense bf16 peak (989 TFLOP/s, H100 and H200 SXM) and against the matmul ceiling measured above, the planner's
  predicted peak and XLA's compiled one against the measured peak (``memory_stats``), and the step's time by
  kind of kernel from a ``jax.profiler`` trace.
* ``torch-gpt2`` / ``torch-llama``: the same shapes and batches in the PyTorch peer (``bench/torch_peer.py``:
  ``torch.compile``, fused AdamW, SDPA flash attention, bf16 autocast), same run.
* ``decode``: the generation engine's decode tokens/s at batch 1 and 64 (GPT-2-small shape, bf16 weights) and its
  memory-bandwidth utilisation: the bytes one decode step must read (every weight once, each row's KV cache)
  over the step's time, against the copy bandwidth measured in ``kernels``.

Every row of ``--out`` (JSON lines) carries the device, driver, CUDA / cuDNN and package versions and the CPU.
``--cpu`` runs every section at tiny sizes on the CPU (the test suite does, so the script cannot rot). Exit status:
0 when every correctness check passed, 1 otherwise (the rows say which), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATASHEET_BF16_TFLOPS = 989.0  # H100 / H200 SXM, dense bf16 (NVIDIA's datasheet)
TOLERANCE = {"float32": 2e-3, "bfloat16": 3e-2}  # relative L2 error against the float32 reference
RUN_MARGIN = 0.8  # the benchmarks run the largest batch planned within this share of the allocator's limit
EQUIVALENCE_RTOL = 1e-4  # device vs CPU losses and gradient norms, float32 at highest matmul precision
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "torch", "transformers",
            "triton", "sentencepiece")

# Sizes: the real shapes on the GPU, tiny ones on the CPU (same code).
SIZES = {
    "gpu": {
        "matmul_n": 8192, "copy_mib": 2048,
        "attention": dict(batch=2, kv_heads=4, groups=2, length=2048, head_dim=128, block=512),
        "shapes": {
            "gpt2": dict(preset="gpt2-small", vocab_size=50304, seq_len=1024, steps=20, tokens_cap=65536),
            "llama": dict(preset="llama2-7b", vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                          d_ff=5632, max_seq_len=2048, seq_len=2048, steps=10, tokens_cap=65536),
        },
        "decode": dict(batches=(1, 64), prompt=128, new_tokens=128),
        "timeout": 180,
    },
    "cpu": {
        "matmul_n": 256, "copy_mib": 16,
        "attention": dict(batch=1, kv_heads=2, groups=2, length=64, head_dim=16, block=16),
        "shapes": {
            "gpt2": dict(preset="tiny-gpt2", vocab_size=512, seq_len=64, steps=2, tokens_cap=256),
            "llama": dict(preset="tiny", vocab_size=512, n_layers=2, seq_len=64, steps=2, tokens_cap=256),
        },
        "decode": dict(batches=(1, 2), prompt=8, new_tokens=4),
        "timeout": 300,
    },
}
# the fused loss (model.loss_chunk): the same shapes, the unembedding + cross-entropy a chunk of positions at a time
for _size, _chunk in (("gpu", 256), ("cpu", 16)):
    for _name in ("gpt2", "llama"):
        SIZES[_size]["shapes"][f"{_name}-fused"] = {**SIZES[_size]["shapes"][_name], "loss_chunk": _chunk}
SECTIONS = ("kernels", "equivalence", "train-gpt2", "train-gpt2-fused", "torch-gpt2", "train-llama",
            "train-llama-fused", "torch-llama", "decode")


# ---- environment ----------------------------------------------------------------------------------------------
def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    plugins = sorted(d.metadata["Name"] for d in importlib.metadata.distributions()
                     if (d.metadata["Name"] or "").startswith("jax-cuda") and d.metadata["Name"].endswith("plugin"))
    for name in plugins:
        out[name] = importlib.metadata.version(name)
    return out


def gpu_info() -> dict:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if r.returncode or not r.stdout.strip():
        return {}
    name, driver, memory, clock = (x.strip() for x in r.stdout.splitlines()[0].split(","))
    return {"gpu": name, "driver": driver, "gpu_memory": memory, "sm_clock_max": clock}


def bench_module(name: str):
    """A module of bench/ (the benchmarks' machine probe, the torch peer), loaded from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def install_wheels(wheels: Path) -> None:
    """Install ``wheels`` (the packages the image lacks) into a private folder, leaving the image's packages as
    they are, and re-run this script with that folder first on the path."""
    site = Path(tempfile.gettempdir()) / "gptjax-gpu-site"
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    if not files:
        raise SystemExit(f"--wheels {wheels}: no .whl files there (tools/fetch_wheels puts them there)")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *files], check=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg == "--wheels" or arg.startswith("--wheels="):
            skip = arg == "--wheels"
            continue
        args.append(arg)
    os.execve(sys.executable, [sys.executable, __file__, *args], env)


# ---- sections (each runs in a child process; prints JSON rows) ------------------------------------------------
def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` (which blocks until its result is ready) over ``repeats`` calls after one."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def section_kernels(size: dict) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gptjax.model import MaskSpec, attend, choose_kernel

    dev = jax.devices()[0]
    try:
        from jax._src.lib import cuda_versions
        cudnn = cuda_versions.cudnn_get_version() if cuda_versions else None
    except Exception:  # noqa: BLE001 - a version probe only
        cudnn = None
    emit({"section": "device", "platform": dev.platform, "device_kind": dev.device_kind, "cudnn": cudnn,
          "memory_limit_gb": round((dev.memory_stats() or {}).get("bytes_limit", 0) / 2**30, 1)})

    # ceilings: bf16 matmul on random data (as gptjax's matmuls run: bf16 operands, float32 accumulation, bf16 out),
    # 4 operand pairs in turn (no pair stays in L2), 20 calls queued then waited for; device copy
    n = size["matmul_n"]
    keys = jax.random.split(jax.random.key(0), 8)
    normal = lambda k: jax.random.normal(k, (n, n), jnp.bfloat16)  # noqa: E731
    pairs = [(normal(keys[2 * i]), normal(keys[2 * i + 1])) for i in range(4)]
    mm = jax.jit(lambda a, b: jnp.einsum("ij,jk->ik", a, b, preferred_element_type=jnp.float32).astype(a.dtype))
    calls = 20

    def queue():
        outs = [mm(*pairs[i % 4]) for i in range(calls)]
        jax.block_until_ready(outs)

    t = timed(queue, 5) / calls
    ka = keys[0]
    x = jax.random.normal(ka, (size["copy_mib"] * 2**18,), jnp.float32)
    cp = jax.jit(lambda x: x * 1.0001)
    tc = timed(lambda: cp(x).block_until_ready(), 10)
    emit({"section": "ceilings", "matmul_bf16_tflops": float(f"{2 * n ** 3 / t / 1e12:.4g}"),  # 4 digits: a
          "matmul_flops": 2 * n ** 3 / t, "matmul_n": n,  # busy CPU's tiny matmul rounded to 0.0 at one decimal
          "copy_gbs": float(f"{2 * x.nbytes / tc / 1e9:.4g}"), "copy_bytes": 2 * x.nbytes,
          "note": "matmul: median of 5 x 20 queued products of 4 random bf16 pairs; copy: bytes read + written"})

    # attention kernels against a float32 dense reference on the host CPU at highest precision
    s = size["attention"]
    B, K, G, L, H = s["batch"], s["kv_heads"], s["groups"], s["length"], s["head_dim"]
    host = jax.devices("cpu")[0]
    rng = np.random.default_rng(1)
    seg = np.sort(rng.integers(0, 3, (B, L)), axis=1).astype(np.int32)  # three packed documents a row
    masks = {"causal": MaskSpec(), "banded": MaskSpec(window=L // 4),
             "segments": MaskSpec(q_segment_ids_BxL=jnp.asarray(seg), k_segment_ids_BxS=jnp.asarray(seg))}

    def loss_fn(impl, mask, dtype):
        def f(q, k, v, do):
            o = attend(q, k, v, mask, impl=impl, block=s["block"], dtype=dtype)
            return jnp.sum(o.astype(jnp.float32) * do), o
        return f

    for mask_name, mask in masks.items():
        q = rng.normal(size=(B, K, G, L, H)).astype(np.float32) / np.sqrt(H)
        k, v, do = (rng.normal(size=shape).astype(np.float32)
                    for shape in ((B, K, L, H), (B, K, L, H), (B, K, G, L, H)))
        for dtype_name in ("float32", "bfloat16"):
            dt = jnp.dtype(dtype_name)
            # the reference sees the inputs the kernel sees (rounded to bf16 for bf16)
            inputs = [np.asarray(jnp.asarray(t).astype(dt).astype(jnp.float32)) for t in (q, k, v)]
            host_mask = MaskSpec(q_segment_ids_BxL=jax.device_put(seg, host),
                                 k_segment_ids_BxS=jax.device_put(seg, host)) if mask.segments else mask
            with jax.default_matmul_precision("highest"):
                (_, ref_o), ref_g = jax.jit(jax.value_and_grad(loss_fn("dense", host_mask, jnp.float32),
                                                               argnums=(0, 1, 2), has_aux=True))(
                    *(jax.device_put(t, host) for t in (*inputs, do)))
            ref = [np.asarray(ref_o)] + [np.asarray(g) for g in ref_g]
            for impl in ("cudnn", "blockwise", "dense"):
                ran = choose_kernel(impl, jax.default_backend(), L, True, mask.segments, dtype=dt)
                f = jax.jit(jax.value_and_grad(loss_fn(impl, mask, dt), argnums=(0, 1, 2), has_aux=True))
                args = [jnp.asarray(t, dt) for t in (q, k, v)] + [jnp.asarray(do)]
                try:
                    (_, o), grads = f(*args)
                except Exception as e:  # noqa: BLE001 - one kernel failing is a row, the others still run
                    emit({"section": "attention", "mask": mask_name, "dtype": dtype_name, "kernel": impl, "ran": ran,
                          "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                    continue
                got = [np.asarray(o.astype(jnp.float32))] + [np.asarray(g.astype(jnp.float32)) for g in grads]
                errors = {name: float(np.linalg.norm(g - r) / np.linalg.norm(r))
                          for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}
                finite = all(np.isfinite(g).all() for g in got)
                ms = timed(lambda: jax.block_until_ready(f(*args)), 5) * 1e3
                emit({"section": "attention", "mask": mask_name, "dtype": dtype_name, "kernel": impl, "ran": ran,
                      "shape_BxKxGxLxH": [B, K, G, L, H],
                      **{f"rel_err_{n}": float(f"{e:.3g}") for n, e in errors.items()},
                      "tolerance": TOLERANCE[dtype_name], "fwd_bwd_ms": round(ms, 3),
                      "ok": finite and max(errors.values()) <= TOLERANCE[dtype_name]})


def section_equivalence(size: dict) -> None:
    """Four float32 training steps of the tiny model on this process's default backend."""
    import jax
    import numpy as np

    from gptjax.config import build_run_config
    from gptjax.sharding import make_mesh
    from gptjax.training import Program

    cfg = build_run_config(model_preset_name="tiny", vocab_size=512, n_layers=2, max_seq_len=128,
                           overrides=["train.batch_size=4", "train.seq_len=128", "train.steps=4", "optim.lr=1e-3",
                                      "optim.warmup_steps=1"])
    with jax.default_matmul_precision("highest"):
        prog = Program(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
        state = prog.init(jax.random.key(0))
        init = [np.asarray(x, np.float64) for x in jax.tree.leaves(state["params"])]
        data = np.random.default_rng(0).integers(0, 512, (4, 4, 129)).astype(np.int32)
        losses, norms = [], []
        for d in data:
            batch = prog.global_batch({"inputs": d[:, :-1], "targets": d[:, 1:],
                                       "loss_mask": np.ones((4, 128), np.float32)})
            state, m = prog.train_step(state, batch)
            losses.append(float(m["loss"]))
            norms.append(float(m["grad_norm"]))
    final = [np.asarray(x, np.float64) for x in jax.tree.leaves(state["params"])]
    np.save(os.environ["GPU_CHECK_PARAMS"], np.concatenate([(f - i).ravel() for f, i in zip(final, init)]))
    emit({"section": "equivalence-side", "backend": jax.default_backend(), "losses": losses, "grad_norms": norms,
          "kernel": cfg.model.attention_impl})


def model_config(shape: dict, batch: int, steps: int):
    from gptjax.config import build_run_config

    fields = {k: v for k, v in shape.items() if k not in ("preset", "seq_len", "steps", "tokens_cap")}
    fields.setdefault("max_seq_len", shape["seq_len"])
    return build_run_config(model_preset_name=shape["preset"], dtype="bfloat16", **fields,
                            overrides=[f"train.batch_size={batch}", f"train.seq_len={shape['seq_len']}",
                                       f"train.steps={steps}"])


def planned_batch(shape: dict, capacity: int) -> tuple[int, int, dict]:
    """The largest power-of-two batch whose analytic plan fits ``capacity`` bytes (at most 1024); the batch the
    benchmark runs: the largest planned within ``RUN_MARGIN`` of it (room for XLA's temporaries, which the analytic
    plan leaves out), at most ``tokens_cap`` tokens; and the plan of the one it runs."""
    from gptjax.planning import analytic_plan

    sizes = {"data": 1, "fsdp": 1, "context": 1, "tensor": 1}
    largest, plans = 0, {}
    b = 1
    while b <= 1024:
        plan = analytic_plan(model_config(shape, b, 1), sizes)
        if plan.total > capacity:
            break
        largest, plans[b] = b, plan
        b *= 2
    if not largest:
        raise SystemExit(f"the planner fits no batch of {shape} in {capacity / 2**30:.1f} GiB")
    run = largest
    while run > 1 and (run * shape["seq_len"] > shape["tokens_cap"] or plans[run].total > RUN_MARGIN * capacity):
        run //= 2
    return largest, run, dict(plans[run].rows())


def section_train(size: dict, name: str) -> None:
    import jax
    import numpy as np

    from gptjax.model import count_params, flops_per_token
    from gptjax.planning import memory_of
    from gptjax.sharding import make_mesh
    from gptjax.training import Program

    shape = size["shapes"][name]
    dev = jax.devices()[0]
    stats = dev.memory_stats()
    capacity = int(stats["bytes_limit"]) if stats else 2 * 2**30
    try:
        largest, batch, plan = planned_batch(shape, capacity)
    except Exception as e:  # noqa: BLE001 - the planner's failure is reported; the benchmark runs a fixed batch
        emit({"section": "planner", "shape": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        largest, batch = 0, max(1, shape["tokens_cap"] // shape["seq_len"] // 4)
        plan = {"total": 0}
    steps, L = shape["steps"], shape["seq_len"]
    cfg = model_config(shape, batch, steps)
    prog = Program(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    state = prog.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    V = cfg.model.vocab_size
    ones = np.ones((batch, L), np.float32)
    batches = [prog.global_batch({"inputs": d[:, :-1], "targets": d[:, 1:], "loss_mask": ones})
               for d in rng.integers(0, V, (2, batch, L + 1)).astype(np.int32)]
    t0 = time.perf_counter()
    compiled = prog.train_step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    xla_peak = memory_of(compiled)["peak"]
    for i in range(2):
        state, m = prog.train_step(state, batches[i % 2])
    jax.block_until_ready(m)
    t = time.perf_counter()
    for i in range(steps):
        state, m = prog.train_step(state, batches[i % 2])
    loss = float(m["loss"])  # waits for the last step
    step_s = (time.perf_counter() - t) / steps
    measured = (dev.memory_stats() or {}).get("peak_bytes_in_use")
    tps = batch * L / step_s
    fpt = flops_per_token(cfg.model, L)
    row = {"section": "train", "impl": "gptjax", "shape": name, "params": count_params(cfg.model), "seq_len": L,
           "batch": batch, "planner_largest_batch": largest, "steps": steps, "tokens_per_s": round(tps, 1),
           "step_ms": round(step_s * 1e3, 2), "tflops": round(tps * fpt / 1e12, 1),
           "mfu_datasheet": round(tps * fpt / (DATASHEET_BF16_TFLOPS * 1e12), 4), "flops_per_token": fpt,
           "compile_s": round(compile_s, 1), "loss": round(loss, 4),
           "attention": prog.model.cfg.attention_impl, "kernel": _kernel(cfg), "remat": cfg.model.remat,
           "planned_peak_gb": round(plan["total"] / 2**30, 3),
           "planned": {k: round(v / 2**30, 3) for k, v in plan.items()},
           "xla_peak_gb": round(xla_peak / 2**30, 3), "allocator_limit_gb": round(capacity / 2**30, 2)}
    if measured:
        row.update(measured_peak_gb=round(measured / 2**30, 3),
                   planned_over_measured=round(plan["total"] / measured, 3),
                   xla_over_measured=round(xla_peak / measured, 3))
    try:
        row["profile"] = profile(prog, state, batches[0])
    except Exception as e:  # noqa: BLE001 - the throughput row stands without its profile
        row["profile"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    emit(row)


def _kernel(cfg) -> str:
    import jax

    from gptjax.model import choose_kernel

    m = cfg.model
    return choose_kernel(m.attention_impl, jax.default_backend(), cfg.train.seq_len, True, False, dtype=m.dtype)


def kernel_category(name: str) -> str:
    """A kernel or HLO op name -> what it does (the profile's rows)."""
    n = name.lower()
    if any(s in n for s in ("cudnn", "fmha", "flash", "attention", "sdpa")):
        return "attention (cuDNN)"
    if any(s in n for s in ("gemm", "cublas", "cutlass", "xmma", "nvjet", "matmul", "dot", "wgmma")):
        return "matmul"
    if any(s in n for s in ("nccl", "all-reduce", "all-gather", "reduce-scatter")):
        return "collective"
    if any(s in n for s in ("memcpy", "memset", "copy")):
        return "copy"
    if "reduce" in n or "scatter" in n:
        return "reduction"
    return "elementwise / other fusion"


def profile(prog, state, batch, steps: int = 2) -> dict:
    """Device time by kind of kernel over ``steps`` train steps, from a ``jax.profiler`` trace: each kind's share
    of the summed kernel time, the top kernels, and the busy fraction (kernel time over wall time)."""
    import glob
    import gzip

    import jax

    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        t = time.perf_counter()
        for _ in range(steps):
            state, m = prog.train_step(state, batch)
        jax.block_until_ready(m)
        wall = time.perf_counter() - t
        jax.profiler.stop_trace()
        files = sorted(glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True))
        if not files:
            return {"error": "no trace written"}
        trace = json.load(gzip.open(files[-1]))
    return summarize_trace(trace["traceEvents"] if isinstance(trace, dict) else trace, steps, wall)


def summarize_trace(events: list[dict], steps: int, wall: float) -> dict:
    """A perfetto trace's device kernels (the processes named for a GPU) over ``steps`` steps that took ``wall``
    seconds: each kind's share of the summed kernel time, the top kernels in ms a step, and kernel vs wall time."""
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, n in names.items() if "gpu" in n.lower() or "/device:" in n.lower()}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in device_pids and "dur" in e]
    if not kernels:
        return {"error": "no device events in the trace", "processes": sorted(set(names.values()))[:8]}
    by_kind: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for e in kernels:
        kind = kernel_category(e["name"] + " " + (e.get("args", {}).get("hlo_op") or ""))
        by_kind[kind] = by_kind.get(kind, 0) + e["dur"]
        by_name[e["name"][:80]] = by_name.get(e["name"][:80], 0) + e["dur"]
    total = sum(by_kind.values())
    return {"wall_ms_per_step": round(wall * 1e3 / steps, 2), "kernel_ms_per_step": round(total / 1e3 / steps, 2),
            "by_kind": {k: round(v / total, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms_per_step": {k: round(v / 1e3 / steps, 3)
                                        for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:6]}}


def section_torch(size: dict, name: str, batch: int) -> None:
    import torch

    make_step = bench_module("torch_peer").make_step

    shape = size["shapes"][name]
    cfg = model_config(shape, batch, shape["steps"]).model
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    peer = {"vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
            "n_kv_heads": cfg.kv_heads, "d_ff": cfg.d_ff, "seq_len": shape["seq_len"],
            "arch": "gpt2" if cfg.positions == "learned" else "llama", "tie_embeddings": cfg.tie_embeddings}
    torch.backends.cuda.matmul.allow_tf32 = True
    step, n_params = make_step(peer, "bfloat16", device=device, compile=cuda)
    L, steps = shape["seq_len"], shape["steps"]
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (2, batch, L + 1), generator=g).to(device)
    t0 = time.perf_counter()
    for i in range(3):  # the first compiles
        loss = step(data[i % 2, :, :-1], data[i % 2, :, 1:])
    loss.item()
    compile_s = time.perf_counter() - t0
    t = time.perf_counter()
    for i in range(steps):
        loss = step(data[i % 2, :, :-1], data[i % 2, :, 1:])
    loss = loss.item()
    step_s = (time.perf_counter() - t) / steps
    from gptjax.model import flops_per_token

    tps = batch * L / step_s
    fpt = flops_per_token(cfg, L)
    emit({"section": "train", "impl": "torch", "shape": name, "params": n_params, "seq_len": L, "batch": batch,
          "steps": steps, "tokens_per_s": round(tps, 1), "step_ms": round(step_s * 1e3, 2),
          "tflops": round(tps * fpt / 1e12, 1), "mfu_datasheet": round(tps * fpt / (DATASHEET_BF16_TFLOPS * 1e12), 4),
          "flops_per_token": fpt, "compile": cuda, "warmup_s": round(compile_s, 1), "loss": round(loss, 4),
          **({"measured_peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3)} if cuda else {})})


def section_decode(size: dict) -> None:
    import jax
    import numpy as np

    from gptjax.inference import Engine, GenerationConfig
    from gptjax.model import ShardedModel
    from gptjax.sharding import single_device_mesh

    s = size["decode"]
    shape = size["shapes"]["gpt2"]
    context = s["prompt"] + s["new_tokens"]
    cfg = model_config(dict(shape, max_seq_len=max(context, shape["seq_len"])), 1, 1).model
    cfg = dataclasses.replace(cfg, param_dtype="bfloat16")
    model = ShardedModel(cfg, single_device_mesh())
    params = model.init_params(jax.random.key(0))
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    kv_row = cfg.n_layers * 2 * cfg.kv_heads * cfg.resolved_head_dim * context * np.dtype(cfg.dtype).itemsize
    rng = np.random.default_rng(0)
    gen = GenerationConfig(max_new_tokens=s["new_tokens"], temperature=0.0, stop_at_eos=False)
    for batch in s["batches"]:
        engine = Engine(model, params, slots=batch, max_len=context)
        prompts = rng.integers(1, cfg.vocab_size, (batch, s["prompt"])).tolist()
        for timed_run in (False, True):  # the first compiles the prefill and the decode step
            config = gen if timed_run else GenerationConfig(max_new_tokens=4, temperature=0.0, stop_at_eos=False)
            reqs = [engine.submit(engine.request(p, config)) for p in prompts]
            t0 = time.perf_counter()
            engine.step()
            t1, n = time.perf_counter(), 0
            while engine.busy:
                engine.step()
                n += 1
            t2 = time.perf_counter()
        assert all(len(r.completion.token_ids) == s["new_tokens"] for r in reqs)
        step_s = (t2 - t1) / max(n, 1)
        read = param_bytes + batch * kv_row
        emit({"section": "decode", "batch": batch, "prompt": s["prompt"], "new_tokens": s["new_tokens"],
              "tokens_per_s": round(batch * s["new_tokens"] / (t2 - t0), 1), "step_ms": round(step_s * 1e3, 3),
              "first_token_ms": round((t1 - t0) * 1e3, 2), "bytes_per_step": read,
              "read_gbs": round(read / step_s / 1e9, 1), "param_dtype": cfg.param_dtype})


# ---- the driver -----------------------------------------------------------------------------------------------
def child_env(cpu: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    if cpu:
        env["JAX_PLATFORMS"] = "cpu"
    return env


class GpuSampler:
    """``nvidia-smi`` sampled every 200 ms while a section runs: mean and max power, median SM clock, max
    temperature and the clock-event reasons seen (a power or thermal cap shows there). Nothing without a GPU."""

    FIELDS = "power.draw,clocks.sm,temperature.gpu,clocks_event_reasons.active"

    def __init__(self, enabled: bool):
        self.proc = None
        if enabled:
            try:
                cmd = ["nvidia-smi", f"--query-gpu={self.FIELDS}", "--format=csv,noheader,nounits", "-lms", "200"]
                self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            except OSError:
                self.proc = None

    def stop(self) -> dict:
        if self.proc is None:
            return {}
        self.proc.terminate()
        out, _ = self.proc.communicate()
        samples = []
        for line in out.splitlines():
            try:
                power, clock, temp, reasons = (x.strip() for x in line.split(","))
                samples.append((float(power), float(clock), float(temp), int(reasons, 16)))
            except ValueError:
                continue
        if not samples:
            return {}
        busy = [x for x in samples if x[1] > 600] or samples  # leave out the idle clock before the work starts
        reasons = 0
        for x in busy:
            reasons |= x[3]
        clocks = sorted(x[1] for x in busy)
        return {"power_w_mean": round(sum(x[0] for x in busy) / len(busy), 1), "power_w_max": max(x[0] for x in busy),
                "sm_clock_mhz_median": clocks[len(clocks) // 2], "temperature_c_max": max(x[2] for x in busy),
                "clock_event_reasons": hex(reasons), "samples": len(busy)}


def run_child(args: list[str], env: dict, timeout: float, log) -> list[dict]:
    """Run this script as a child for one section; its JSON rows, or one error row. On a GPU each row carries the
    card's power and clocks while the section ran (``gpu_during``)."""
    t = time.perf_counter()
    sampler = GpuSampler(bool(gpu_info()) and "JAX_PLATFORMS" not in env)
    try:
        r = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env,
                           timeout=timeout)
        out, err, rc = r.stdout, r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        out, err, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout", -1
    during = sampler.stop()
    log.write(f"### {' '.join(args)} rc={rc} {time.perf_counter() - t:.1f}s\n{out}\n{err}\n")
    log.flush()
    rows = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    if during:
        for row in rows:
            row["gpu_during"] = during
    if rc:
        tail = [ln for ln in (err or "").strip().splitlines() if ln.strip()][-3:]
        rows.append({"section": args[0], "error": " | ".join(tail) or f"exit {rc}"})
    for row in rows:
        row.setdefault("seconds", round(time.perf_counter() - t, 1))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (what the test suite runs)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON lines, appended (default: bench/results/gpu-DATE.jsonl)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of: {', '.join(SECTIONS)}")
    p.add_argument("--wheels", type=Path, default=None, help="install these wheels (no deps) before running")
    p.add_argument("--log", type=Path, default=None, help="every child's output (default: next to --out)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    size = SIZES["cpu" if a.cpu else "gpu"]
    if a.child:
        section, *rest = a.child
        if section == "kernels":
            section_kernels(size)
        elif section == "equivalence":
            section_equivalence(size)
        elif section == "train":
            section_train(size, rest[0])
        elif section == "torch":
            section_torch(size, rest[0], int(rest[1]))
        elif section == "decode":
            section_decode(size)
        elif section == "plan":
            section_plan(size, rest[0])
        return 0
    if a.wheels:
        install_wheels(a.wheels)
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(unknown)}; sections: {', '.join(SECTIONS)}")
    date = datetime.date.today().isoformat()
    out = a.out or ROOT / "bench" / "results" / f"gpu-{date}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = a.log or out.with_suffix(".log")
    common = {"date": date, "mode": "cpu" if a.cpu else "gpu", **gpu_info(), **bench_module("machine").cpu(),
              "versions": versions()}
    print(json.dumps(common), flush=True)
    env = child_env(a.cpu)
    flag = ["--cpu"] if a.cpu else []
    rows: list[dict] = []
    with open(log_path, "a") as log, open(out, "a") as sink:
        ceiling: dict[str, float] = {}

        def record(new: list[dict]) -> None:
            for row in new:
                if row.get("section") == "ceilings":
                    ceiling["flops"] = row["matmul_flops"]
                if row.get("section") == "train" and "flops_per_token" in row and ceiling:
                    flops = row["tokens_per_s"] * row["flops_per_token"]
                    row["mfu_measured_matmul"] = float(f"{flops / ceiling['flops']:.4g}")
                row = {**row, **common}
                rows.append(row)
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                print(json.dumps({k: v for k, v in row.items() if k not in common}), flush=True)

        cpu_side = None
        if "equivalence" in only:  # the CPU side runs beside the device sections
            params_cpu = tempfile.NamedTemporaryFile(suffix=".npy", delete=False).name
            cpu_side = subprocess.Popen([sys.executable, __file__, "--child", "equivalence", *flag],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**child_env(True), "GPU_CHECK_PARAMS": params_cpu})
        batches: dict[str, int] = {}
        for section in only:
            if section == "kernels":
                record(run_child(["kernels", *flag], env, size["timeout"], log))
            elif section == "equivalence":
                params_dev = tempfile.NamedTemporaryFile(suffix=".npy", delete=False).name
                device = run_child(["equivalence", *flag], {**env, "GPU_CHECK_PARAMS": params_dev}, size["timeout"],
                                   log)
                cpu_out, cpu_err = cpu_side.communicate(timeout=size["timeout"])
                log.write(f"### equivalence (cpu) rc={cpu_side.returncode}\n{cpu_out}\n{cpu_err}\n")
                log.flush()
                host = [json.loads(ln) for ln in cpu_out.splitlines() if ln.startswith("{")]
                record([compare_sides(device, host, params_dev, params_cpu)])
            elif section.startswith("train-"):
                name = section.split("-", 1)[1]
                new = run_child(["train", name, *flag], env, size["timeout"], log)
                batches.setdefault(name, next((r["batch"] for r in new if "batch" in r), None))
                record(new)
            elif section.startswith("torch-"):
                name = section.split("-", 1)[1]
                if batches.get(name) is None:  # the batch gptjax ran (the planner's), else the planner's own answer
                    batches[name] = planner_batch_in_child(name, flag, env, log)
                record(run_child(["torch", name, str(batches[name]), *flag], env, size["timeout"], log))
            elif section == "decode":
                record(run_child(["decode", *flag], env, size["timeout"], log))
    summary(rows)
    failed = [r for r in rows if r.get("ok") is False or "error" in r]
    print(f"wrote {out} ({len(rows)} rows); {len(failed)} failed"
          + (f": {[r.get('section') for r in failed]}" if failed else ""))
    return 1 if failed else 0


def planner_batch_in_child(name: str, flag: list[str], env: dict, log) -> int:
    """The batch the planner gives ``name`` on this device (when the torch peer runs without gptjax's row)."""
    rows = run_child(["plan", name, *flag], env, SIZES["cpu" if flag else "gpu"]["timeout"], log)
    return next((r["batch"] for r in rows if "batch" in r), 1)


def section_plan(size: dict, name: str) -> None:
    import jax

    stats = jax.devices()[0].memory_stats()
    emit({"section": "plan", "batch": planned_batch(size["shapes"][name], int(stats["bytes_limit"]) if stats
                                                    else 2 * 2**30)[1]})


def compare_sides(device: list[dict], host: list[dict], params_dev: str, params_cpu: str) -> dict:
    import numpy as np

    d = next((r for r in device if r.get("section") == "equivalence-side"), None)
    h = next((r for r in host if r.get("section") == "equivalence-side"), None)
    if d is None or h is None:
        return {"section": "equivalence", "error": f"a side failed: device {device[-1:]} cpu {host[-1:]}"}
    loss = max(abs(x - y) / abs(y) for x, y in zip(d["losses"], h["losses"]))
    norm = max(abs(x - y) / abs(y) for x, y in zip(d["grad_norms"], h["grad_norms"]))
    ud, uh = np.load(params_dev), np.load(params_cpu)
    update = float(np.linalg.norm(ud - uh) / np.linalg.norm(uh))
    return {"section": "equivalence", "device_backend": d["backend"], "losses_device": d["losses"],
            "losses_cpu": h["losses"], "max_rel_loss": loss, "max_rel_grad_norm": norm, "rel_update_diff": update,
            "tolerance": EQUIVALENCE_RTOL,
            "ok": loss <= EQUIVALENCE_RTOL and norm <= EQUIVALENCE_RTOL and update <= 100 * EQUIVALENCE_RTOL}


def summary(rows: list[dict]) -> None:
    """The short table the GPU run ends with."""
    print("\n# summary")
    for r in rows:
        s = r.get("section")
        if "error" in r:
            print(f"{s:12s} ERROR {r['error'][:150]}")
        elif s == "ceilings":
            print(f"ceilings     matmul bf16 {r['matmul_bf16_tflops']} TFLOP/s, copy {r['copy_gbs']} GB/s")
        elif s == "attention" and not r["ok"]:
            print(f"attention    FAIL {r['mask']} {r['dtype']} {r['kernel']}->{r['ran']}: "
                  f"{max(v for k, v in r.items() if k.startswith('rel_err'))}")
        elif s == "equivalence":
            print(f"equivalence  {'ok' if r['ok'] else 'FAIL'} loss {r['max_rel_loss']:.2e} grad norm "
                  f"{r['max_rel_grad_norm']:.2e} update {r['rel_update_diff']:.2e}")
        elif s == "train":
            mem = f" peak {r.get('measured_peak_gb')} GB"
            if r["impl"] == "gptjax":
                mem += f" (planned {r['planned_peak_gb']}, xla {r['xla_peak_gb']})"
            print(f"train        {r['impl']:6s} {r['shape']:10s} b{r['batch']} {r['tokens_per_s']:>10} tok/s "
                  f"MFU {r['mfu_datasheet']:.3f}{mem}")
        elif s == "decode":
            print(f"decode       batch {r['batch']}: {r['tokens_per_s']} tok/s, step {r['step_ms']} ms, "
                  f"{r['read_gbs']} GB/s read")
    n = sum(1 for r in rows if r.get("section") == "attention")
    bad = sum(1 for r in rows if r.get("section") == "attention" and not r.get("ok"))
    if n:
        print(f"attention    {n - bad}/{n} kernel rows within tolerance")


if __name__ == "__main__":
    sys.exit(main())
