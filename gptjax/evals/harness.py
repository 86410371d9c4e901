"""An lm-evaluation-harness backend: a gptjax run directory evaluated by EleutherAI's harness, no conversion step.

    gptjax-eval harness --model_args run_dir=runs/austen --tasks my_task --include_path my_tasks/

``gptjax-eval harness ARGS`` is the harness's own command line (``lm_eval ARGS``) with this backend registered
as ``--model gptjax``. Plain ``lm_eval --model gptjax`` does not find it: the harness has no plugin discovery
(0.4.x registers only its own models, and looks up no entry points), so the model class must be imported before
its command line runs, which is what ``gptjax-eval harness`` does. From Python, ``import gptjax.evals.harness``
registers it for ``lm_eval.simple_evaluate(model="gptjax", ...)``.

Model arguments: ``run_dir`` (required), ``step`` (default the latest intact checkpoint), ``devices`` (local devices
the batch is split over, default 1), ``rows`` (packed rows per forward pass, default 8), ``max_gen_toks``
(default 256), ``slots`` (generation rows, default 8).

* ``loglikelihood``: the harness splits each (context, continuation) into tokens as for any causal model
  (``TemplateLM._encode_pair``); the requests are scored packed many to a row (:mod:`gptjax.evals.scoring`).
* ``loglikelihood_rolling``: the harness's disjoint rolling windows of the model's context, the first token after
  ``</s>``, every window packed and scored the same way.
* ``generate_until``: through the generation engine (continuous batching), greedy unless ``do_sample`` or a
  temperature > 0 is asked for, stopping at any of ``until``; a context longer than fits with ``max_gen_toks``
  keeps its last tokens, as the harness's ``hf`` backend does.

Parity (``tests/test_harness.py``): on a checkpoint exported with ``gptjax-export``, every request's
log-likelihood is within 1e-4 of the harness's ``hf`` backend on the same task, and the accuracies are equal.
"""

from __future__ import annotations

import collections
from typing import Any

import jax
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from gptjax.checkpoint import load_run
from gptjax.config import MeshConfig
from gptjax.evals.scoring import Request, Scorer
from gptjax.inference import Engine, GenerationConfig
from gptjax.sharding import make_mesh


@register_model("gptjax")
class GptjaxLM(TemplateLM):
    def __init__(self, run_dir: str, step: int | None = None, devices: int = 1, rows: int = 8,
                 max_gen_toks: int = 256, slots: int = 8, **_ignored: Any):
        super().__init__()
        devices, rows, slots, max_gen_toks = int(devices), int(rows), int(slots), int(max_gen_toks)
        mesh = make_mesh(MeshConfig(data=devices), jax.local_devices()[:devices])
        loaded = load_run(run_dir, None if step is None else int(step), mesh)
        self.model, self.params, self.tokenizer = loaded.model, loaded.params, loaded.tokenizer
        self.scorer = Scorer(self.model, self.params, rows=rows)
        self.max_gen_toks, self.slots = max_gen_toks, slots
        self._engine: Engine | None = None

    # ---- what TemplateLM asks for -------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        results = self.scorer.loglikelihood([Request(ctx, cont) for _, ctx, cont in requests])
        out = []
        for (key, _, _), r in zip(requests, results):
            out.append((r.logprob, r.greedy))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (r.logprob, r.greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(r.args for r in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(Request(ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, r in zip(owner, self.scorer.loglikelihood(windows)):
            totals[i] += r.logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = collections.defaultdict(list)  # one engine call per generation setting
        configs = {}
        for i, req in enumerate(requests):
            context, kwargs = req.args
            config = self._generation_config(dict(kwargs))
            groups[config].append(i)
            configs[i] = config
        out = [""] * len(requests)
        for config, members in tqdm(groups.items(), disable=disable_tqdm, desc="gptjax generate_until"):
            room = self.max_length - config.max_new_tokens
            prompts = [self.tok_encode(requests[i].args[0])[-room:] for i in members]
            for i, completion in zip(members, self.engine.generate(prompts, config)):
                out[i] = completion.text
                self.cache_hook.add_partial("generate_until", requests[i].args, completion.text)
        return out

    # ---- helpers ----------------------------------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.model, self.params, self.tokenizer, slots=self.slots)
        return self._engine

    def _generation_config(self, kwargs: dict) -> GenerationConfig:
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        max_new = max(1, min(max_new, self.max_length - 1))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if kwargs.pop("do_sample", None) is False:
            temperature = 0.0
        return GenerationConfig(max_new_tokens=max_new, temperature=temperature,
                                top_p=float(kwargs.pop("top_p", 1.0) or 1.0), top_k=int(kwargs.pop("top_k", 0) or 0),
                                seed=int(kwargs.pop("seed", 0) or 0), stop=tuple(s for s in until if s))
