"""Generation benchmark: the engine against the recompute loop it replaced and against transformers' ``generate()``
on the same exported weights, same machine, same run; and speculative decoding on two trained runs.

    python bench/generate_bench.py                                   # tiny + gpt2ish, batch 1 and 16, 512 + 256
    python bench/generate_bench.py --configs tiny --batches 1 --new-tokens 64
    python bench/generate_bench.py --speculative runs/austen runs/austen-draft   # acceptance and speed-up only

Throughput rows (random weights, greedy, every row generates all ``--new-tokens`` after a ``--prompt``-token
prompt): new tokens/s (all rows' new tokens over the wall time from submitting the prompts to the last token,
prefill included), time to the first token (the prefill) and latency per decode step, for

* ``engine``: :class:`gptjax.inference.Engine` with ``slots = batch`` (KV cache, one compiled decode step);
* ``recompute``: the loop ``gptjax-sample`` ran before the engine (``gptjax/inference/sample.py`` at f23a328,
  copied below): a jitted ``fori_loop`` that runs the full forward pass over the whole prompt + new-token buffer
  for every new token, one prompt at a time. Each of its steps costs the same (the buffer has a fixed length), so
  it is timed over ``--recompute-tokens`` tokens and the batch-B figure is B prompts one after another;
* ``transformers``: ``model.generate(do_sample=False)`` with its (dynamic) KV cache on the weights ``gptjax-export``
  wrote, the batch as one tensor (the prompts have one length), ``torch.set_num_threads`` = the machine's cores.

Decode's memory-bandwidth utilisation: the bytes a decode step reads (every parameter once, the whole KV cache
buffer of each row) over the step's time, divided by the read bandwidth measured here (a jitted sum over 1 GiB).
Results are JSON lines; the CPU (model, flags) is in every row.

Speculative rows (``--speculative TARGET DRAFT``, two runs with the same tokenizer): prompts from the target run's
validation tokens; for each draft length and temperature, the acceptance rate per draft position, tokens per
round, the measured speed-up over plain decoding with the same engine, and the speed-up Leviathan et al. (2023)
predict from the measured acceptance ``a`` and cost ratio ``c`` (a draft decode step's time over the target's):
``(1 - a^(g+1)) / ((1 - a)(g c + 1))``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from machine import cpu  # siblings (bench/ is the script's directory): the machine probe,
from train_bench import CONFIGS  # and the training benchmark's shapes


def read_bandwidth_gbs() -> float:
    """Best of 5: GB/s of a jitted sum over a 1 GiB float32 array (read bandwidth as XLA's kernels see it)."""
    x = jnp.ones((1 << 28,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    best = min(_timed(lambda: f(x).block_until_ready()) for _ in range(5))
    return x.nbytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---- the recompute loop the engine replaced (gptjax/inference/sample.py at f23a328, greedy path) -------------
@partial(jax.jit, static_argnums=(0, 3, 4))
def recompute_generate(forward, params, buffer_L, prompt_len: int, n_new: int):
    def step(i, buf):
        pos = prompt_len + i
        logits = forward(params, buf[None])[0, pos - 1]
        return buf.at[pos].set(jnp.argmax(logits, axis=-1).astype(buf.dtype))

    return jax.lax.fori_loop(0, n_new, step, buffer_L)


# ---- throughput ----------------------------------------------------------------------------------------------
def model_config(name: str, context: int):
    from gptjax.config import build_run_config

    c = CONFIGS[name]
    return build_run_config(
        model_preset_name="tiny", vocab_size=c["vocab_size"], d_model=c["d_model"], n_layers=c["n_layers"],
        n_heads=c["n_heads"], n_kv_heads=c["n_kv_heads"], d_ff=c["d_ff"], max_seq_len=context, dtype="float32",
        overrides=["train.batch_size=1", f"train.seq_len={min(context, 512)}", "train.progress=false"])


def time_engine(engine, prompts: list[list[int]], new: int) -> dict:
    from gptjax.inference import GenerationConfig

    config = GenerationConfig(max_new_tokens=new, temperature=0.0, stop_at_eos=False)
    requests = [engine.submit(engine.request(p, config)) for p in prompts]
    t0 = time.perf_counter()
    engine.step()  # every row prefilled, and its first token decoded
    t1, steps = time.perf_counter(), 0
    while engine.busy:
        engine.step()
        steps += 1
    t2 = time.perf_counter()
    assert all(len(r.completion.token_ids) == new for r in requests)
    return {"total_s": t2 - t0, "first_token_s": t1 - t0, "step_ms": 1e3 * (t2 - t1) / max(steps, 1),
            "tokens": [r.completion.token_ids for r in requests]}


def time_recompute(model, params, prompt: list[int], new: int, timed_tokens: int) -> dict:
    buf = np.zeros(len(prompt) + new, np.int32)
    buf[: len(prompt)] = prompt
    buf = jnp.asarray(buf)
    recompute_generate(model.forward, params, buf, len(prompt), 1).block_until_ready()  # compile
    recompute_generate(model.forward, params, buf, len(prompt), timed_tokens).block_until_ready()
    per_token = _timed(lambda: recompute_generate(model.forward, params, buf, len(prompt),
                                                  timed_tokens).block_until_ready()) / timed_tokens
    return {"step_ms": 1e3 * per_token}


def time_transformers(hf_model, prompts: list[list[int]], new: int) -> dict:
    import torch
    import transformers

    ids = torch.tensor(prompts)

    def gen(n: int):
        config = transformers.GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                               eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            return hf_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)

    gen(2)  # warm-up
    first = _timed(lambda: gen(1))
    t = time.perf_counter()
    out = gen(new)
    total = time.perf_counter() - t
    return {"total_s": total, "first_token_s": first, "step_ms": 1e3 * (total - first) / (new - 1),
            "tokens": out[:, len(prompts[0]):].tolist()}


def throughput(a, machine: dict, bandwidth: float) -> list[dict]:
    import torch
    import transformers

    from gptjax.data import Tokenizer, default_corpus_path, read_corpus, split_documents
    from gptjax.inference import Engine
    from gptjax.model import ShardedModel
    from gptjax.sharding import single_device_mesh
    from gptjax.training import seed_run

    torch.set_num_threads(os.cpu_count())
    rows = []
    for name in a.configs:
        context = a.prompt + a.new_tokens
        cfg = model_config(name, context)
        model = ShardedModel(cfg.model, single_device_mesh())
        params = model.init_params(jax.random.key(0))
        with tempfile.TemporaryDirectory() as tmp:
            cfg = cfg.replace(train={"run_dir": f"{tmp}/run"})
            # export writes the tokenizer with the weights: one of the model's vocabulary, on the embedded corpus
            tokenizer = Tokenizer.train(split_documents(read_corpus(default_corpus_path()), None),
                                        cfg.model.vocab_size, sample_chars=2_000_000)
            seed_run(cfg, jax.device_get(params), tokenizer.proto, {"bench": name})
            subprocess.run([Path(sys.executable).parent / "gptjax-export", "--run-dir", cfg.train.run_dir, "--out",
                            f"{tmp}/hf", "--no-progress"], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/hf", torch_dtype=torch.float32)
        hf_model.eval()
        param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
        if not cfg.model.tie_embeddings:  # the input table is gathered (a row per token), not read whole
            param_bytes -= params["embed"]["embedding"].nbytes
        hd = cfg.model.d_model // cfg.model.n_heads
        kv_heads = cfg.model.n_kv_heads or cfg.model.n_heads
        cache_row_bytes = cfg.model.n_layers * 2 * kv_heads * hd * context * 4
        rng = np.random.default_rng(0)
        recompute = None
        for batch in a.batches:
            prompts = rng.integers(1, cfg.model.vocab_size, (batch, a.prompt)).tolist()
            engine = Engine(model, params, slots=batch, max_len=context)
            time_engine(engine, prompts, 4)  # compile: the 512 bucket's prefill and the decode step
            results = {"engine": time_engine(engine, prompts, a.new_tokens)}
            if recompute is None:  # one prompt at a time: the batch-1 step, once per config
                recompute = time_recompute(model, params, prompts[0], a.new_tokens, a.recompute_tokens)
            step = recompute["step_ms"] / 1e3
            results["recompute"] = {"total_s": batch * a.new_tokens * step, "first_token_s": step,
                                    "step_ms": 1e3 * step * batch}
            results["transformers"] = time_transformers(hf_model, prompts, a.new_tokens)
            same = np.mean([x == y for p, q in zip(results["engine"]["tokens"], results["transformers"]["tokens"])
                            for x, y in zip(p, q)])
            for impl, r in results.items():
                row = {"config": name, "batch": batch, "prompt": a.prompt, "new_tokens": a.new_tokens, "impl": impl,
                       "tokens_per_s": round(batch * a.new_tokens / r["total_s"], 1),
                       "first_token_ms": round(1e3 * r["first_token_s"], 1), "step_ms": round(r["step_ms"], 2),
                       "latency_per_token_ms": round(r["step_ms"], 2)}
                if impl == "engine":
                    read = param_bytes + batch * cache_row_bytes
                    row.update(decode_bytes_per_step=read, read_bandwidth_gbs=round(bandwidth, 1),
                               bandwidth_utilisation=round(read / (r["step_ms"] / 1e3) / (bandwidth * 1e9), 3),
                               greedy_tokens_equal_transformers=round(float(same), 4))
                if impl == "recompute":
                    row["timed_tokens"] = a.recompute_tokens
                rows.append({**row, **machine})
                print(json.dumps(rows[-1]), flush=True)
            by = {r["impl"]: r for r in rows[-3:]}
            ratio = {"config": name, "batch": batch,
                     "engine_over_recompute": round(by["engine"]["tokens_per_s"] / by["recompute"]["tokens_per_s"], 1),
                     "engine_over_transformers": round(by["engine"]["tokens_per_s"]
                                                       / by["transformers"]["tokens_per_s"], 2)}
            rows.append(ratio)
            print(json.dumps(ratio), flush=True)
    return rows


# ---- speculative ---------------------------------------------------------------------------------------------
def speculative(a, machine: dict) -> list[dict]:
    from gptjax.checkpoint import load_run
    from gptjax.data import run_corpus
    from gptjax.inference import Engine, GenerationConfig, SpeculativeStats
    from gptjax.runs import RunDir

    target_dir, draft_dir = a.speculative
    if RunDir(target_dir).tokenizer.read_bytes() != RunDir(draft_dir).tokenizer.read_bytes():
        raise SystemExit(f"{target_dir} and {draft_dir} have different tokenizers: no speculative decoding")
    t, d = load_run(target_dir, tokenizer=False), load_run(draft_dir, tokenizer=False)
    (tcfg, tparams, target), (dparams, draft) = (t.config, t.params, t.model), (d.params, d.model)
    val = run_corpus(tcfg.data, tcfg.model.vocab_size, target_dir).stream("val")
    prompt_len = a.spec_prompt
    new = min(a.spec_new_tokens, tcfg.model.max_seq_len - prompt_len - max(a.draft_tokens))
    starts = np.random.default_rng(0).integers(0, len(val) - prompt_len, a.spec_prompts)
    prompts = [val[s:s + prompt_len].tolist() for s in starts]
    rows = []

    def timed(engine, config):
        engine.generate(prompts[:1], config.replace(max_new_tokens=4))  # compile
        t = time.perf_counter()
        out = engine.generate(prompts, config)
        return time.perf_counter() - t, out

    for batch in a.spec_batches:
        step_ms = {}
        for role, (m, p) in {"target": (target, tparams), "draft": (draft, dparams)}.items():
            e = Engine(m, p, slots=batch)
            r = time_engine(e, [prompts[0]] * batch, 64)  # one decode step's time at this batch
            step_ms[role] = r["step_ms"]
        c = step_ms["draft"] / step_ms["target"]
        for temperature in a.temperatures:
            config = GenerationConfig(max_new_tokens=new, temperature=temperature, stop_at_eos=False, seed=1)
            plain_s, plain = timed(Engine(target, tparams, slots=batch), config)
            for g in a.draft_tokens:
                engine = Engine(target, tparams, slots=batch, draft=(draft, dparams), draft_tokens=g)
                spec_s, out = timed(engine, config)
                engine.stats = SpeculativeStats(np.zeros(g, np.int64), np.zeros(g, np.int64))
                spec_s, out = timed(engine, config)  # stats of the timed run only
                if temperature == 0:
                    assert [o.token_ids for o in out] == [o.token_ids for o in plain], "speculative greedy != greedy"
                s = engine.stats
                alpha = s.accepted.sum() / s.proposed.sum()
                predicted = (1 - alpha ** (g + 1)) / ((1 - alpha) * (g * c + 1))
                row = {"target": target_dir, "draft": draft_dir, "batch": batch, "temperature": temperature,
                       "draft_tokens": g, "prompts": len(prompts), "prompt": prompt_len, "new_tokens": new,
                       "acceptance_per_position": [round(float(x), 3) for x in s.acceptance],
                       "acceptance": round(float(alpha), 3), "tokens_per_round": round(s.tokens_per_round, 2),
                       "target_step_ms": round(step_ms["target"], 2), "draft_step_ms": round(step_ms["draft"], 2),
                       "cost_ratio": round(c, 3), "plain_tokens_per_s": round(len(prompts) * new / plain_s, 1),
                       "speculative_tokens_per_s": round(len(prompts) * new / spec_s, 1),
                       "speedup": round(plain_s / spec_s, 2), "leviathan_predicted_speedup": round(predicted, 2),
                       **machine}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["tiny", "gpt2ish"], choices=["tiny", "gpt2ish"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--recompute-tokens", type=int, default=8, help="tokens the recompute loop is timed over")
    p.add_argument("--speculative", nargs=2, metavar=("TARGET_RUN", "DRAFT_RUN"),
                   help="measure speculative decoding on these two runs instead of throughput")
    p.add_argument("--draft-tokens", nargs="+", type=int, default=[2, 4])
    p.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    p.add_argument("--spec-batches", nargs="+", type=int, default=[1])
    p.add_argument("--spec-prompts", type=int, default=8)
    p.add_argument("--spec-prompt", type=int, default=64)
    p.add_argument("--spec-new-tokens", type=int, default=128)
    p.add_argument("--out", help="also append the rows to this JSON-lines file")
    a = p.parse_args()
    machine = cpu()
    if a.speculative:
        rows = speculative(a, machine)
    else:
        bandwidth = read_bandwidth_gbs()
        print(json.dumps({"read_bandwidth_gbs": round(bandwidth, 1), **machine}), flush=True)
        rows = throughput(a, machine, bandwidth)
    if a.out:
        with open(a.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
