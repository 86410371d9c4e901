"""gptjax architectures <-> Hugging Face transformers model families.

Each family is a small adapter (the torchtitan ``state_dict_adapter`` pattern): the HF ``config.json`` it writes
for a ``ModelConfig`` and the ``ModelConfig`` it reads back, and a key map with a layer placeholder, one entry per
HF tensor, saying which gptjax parameters it is made of and how (transpose, reshape, concatenate, scale)::

    gptjax                                         HF family
    rope + rmsnorm + swiglu (MHA/GQA/MQA,          LlamaForCausalLM
      biases on/off, tied or untied), dense
    the same with qk_norm (dense, or GPT-3         Qwen3ForCausalLM (per-head q/k RMSNorm; layer_types
      alternating dense / banded)                    full_attention / sliding_attention, sliding_window)
    learned + layernorm + gelu (tanh), MHA, dense  GPT2LMHeadModel (Conv1D weights are [in, out];
                                                     activation gelu_new)
    the same, alternating dense / banded           GPTNeoForCausalLM (attention_types global/local,
                                                     window_size; it does not scale scores by 1/sqrt(head_dim),
                                                     so export folds that factor into q_proj)

Anything else (a combination no family expresses, e.g. learned positions with RMSNorm, GQA in GPT-2, q/k/v
biases in GPT-Neo, MLP biases in Qwen3) is refused by :func:`family_for` with every offending feature named.
Conversions are exact (transposes, reshapes, splits) except GPT-Neo's folded score scale, which is exact when
sqrt(head_dim) is a power of two (head_dim 4, 16, 64, 256) and otherwise within one float32 rounding.

Parameter names are gptjax's, dotted, with ``{}`` for the layer: ``blocks.{}.attn.w_q``; the reader resolves them
for either layout (per-layer ``blocks.3.attn.w_q`` or a layer slice of scan-stacked ``blocks.attn.w_q``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from gptjax.config import ModelConfig

# The files of a Hugging Face model directory that export writes and import reads besides the weights.
HF_CONFIG = "config.json"
HF_TOKENIZER = "tokenizer.model"  # a sentencepiece model, as LLaMA-family directories ship it


class UnsupportedArchitecture(ValueError):
    """A model that has no exact counterpart on the other side; the message names every feature in the way."""


@dataclass(frozen=True)
class HFTensor:
    """One HF tensor: made from gptjax parameters ``sources`` (of ``layer``) by ``to_hf``; ``from_hf`` gives
    them back (a tuple, in ``sources`` order). No sources: a tensor gptjax does not have, written as zeros and
    required to be zero on import."""

    name: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    to_hf: Callable[..., np.ndarray]
    from_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    layer: int | None = None


def _identity(name: str, shape, src: str, layer=None) -> HFTensor:
    return HFTensor(name, tuple(shape), (src,), lambda a: a, lambda a: (a,), layer)


def _zeros(name: str, shape, layer=None) -> HFTensor:
    return HFTensor(name, tuple(shape), (), lambda: np.zeros(shape, np.float32), lambda a: (), layer)


class Family:
    """Subclasses: ``model_type``, ``architecture``, ``problems``, ``hf_config``, ``model_config``,
    ``tensors``."""

    model_type = ""
    architecture = ""
    # Buffers some HF checkpoints carry that are not parameters (ignored on import)
    ignored_suffixes: tuple[str, ...] = ()

    def problems(self, cfg: ModelConfig) -> list[str]:
        raise NotImplementedError

    def hf_config(self, cfg: ModelConfig, eos_id: int, dtype: str) -> dict:
        raise NotImplementedError

    def model_config(self, hf: dict) -> ModelConfig:
        raise NotImplementedError

    def tensors(self, cfg: ModelConfig) -> list[HFTensor]:
        raise NotImplementedError

    # shared pieces
    def _refuse(self, problems: list[str]) -> None:
        """An HF config's features gptjax cannot represent, all named at once (nothing when there are none)."""
        if problems:
            raise UnsupportedArchitecture(f"{self.architecture} features gptjax cannot represent: "
                                          + "; ".join(problems))

    def _common(self, cfg: ModelConfig, eos_id: int, dtype: str) -> dict:
        return {"architectures": [self.architecture], "model_type": self.model_type, "vocab_size": cfg.vocab_size,
                "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": None, "eos_token_id": eos_id,
                "pad_token_id": None, "dtype": dtype, "use_cache": True, "initializer_range": cfg.init_std}


def _require(problems: list[str], cond: bool, text: str) -> None:
    if not cond:
        problems.append(text)


def _gelu_problems(hf: dict) -> list[str]:
    """GPT-2 / GPT-Neo: the activation must be the tanh GELU gptjax computes."""
    act = _hf_value(hf, "activation_function", "gelu_new")
    return [] if act in ("gelu_new", "gelu_pytorch_tanh") else [
        f"activation_function={act!r} (gptjax's GELU is the tanh approximation: gelu_new / gelu_pytorch_tanh)"]


def _hf_value(hf: dict, key: str, default: Any = None) -> Any:
    return hf.get(key, default) if hf.get(key) is not None else default


# ---- LLaMA and Qwen3 ------------------------------------------------------------------------------------------
class Llama(Family):
    model_type, architecture = "llama", "LlamaForCausalLM"
    ignored_suffixes = ("rotary_emb.inv_freq",)
    qk_norm = False

    def problems(self, cfg: ModelConfig) -> list[str]:
        p: list[str] = []
        _require(p, cfg.norm == "rmsnorm", f"norm={cfg.norm} ({self.architecture} uses RMSNorm)")
        _require(p, cfg.mlp == "swiglu", f"mlp={cfg.mlp} ({self.architecture} uses a SwiGLU MLP)")
        _require(p, cfg.qk_norm == self.qk_norm,
                 f"qk_norm={cfg.qk_norm} ({self.architecture} {'has' if self.qk_norm else 'has no'} q/k norm)")
        if not self.qk_norm:
            _require(p, cfg.attention == "dense", "attention=alternating (LlamaForCausalLM has no banded layers; "
                     "Qwen3 has them, with qk_norm)")
        return p

    def hf_config(self, cfg: ModelConfig, eos_id: int, dtype: str) -> dict:
        out = {**self._common(cfg, eos_id, dtype), "hidden_size": cfg.d_model,
               "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
               "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
               "head_dim": cfg.resolved_head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
               "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
               "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
               "attention_bias": cfg.use_bias, "attention_dropout": 0.0}
        if self.qk_norm:
            windows = cfg.layer_windows()
            banded = [w < cfg.max_seq_len for w in windows]
            out.update(layer_types=["sliding_attention" if b else "full_attention" for b in banded],
                       use_sliding_window=any(banded), sliding_window=min(windows) if any(banded) else None,
                       max_window_layers=cfg.n_layers)
        else:
            out.update(mlp_bias=cfg.use_bias, pretraining_tp=1)
        return out

    def model_config(self, hf: dict) -> ModelConfig:
        p: list[str] = []
        _require(p, _hf_value(hf, "hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')!r} (not silu)")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        _require(p, rope_type == "default", f"rope_type={rope_type!r} (gptjax's RoPE has no scaling)")
        theta = rope.get("rope_theta", _hf_value(hf, "rope_theta", 10000.0))
        d, h = hf["hidden_size"], hf["num_attention_heads"]
        fields = dict(vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=h,
                      n_kv_heads=_hf_value(hf, "num_key_value_heads", h), head_dim=_hf_value(hf, "head_dim", d // h),
                      d_ff=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"], positions="rope",
                      rope_theta=float(theta), norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                      mlp="swiglu", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                      qk_norm=self.qk_norm)
        attn_bias = bool(hf.get("attention_bias", False))
        if self.qk_norm:
            _require(p, not attn_bias, "attention_bias=true (gptjax's biases include MLP biases, which Qwen3 lacks)")
            kinds = hf.get("layer_types") or ["full_attention"] * fields["n_layers"]
            banded = [k == "sliding_attention" for k in kinds]
            unknown = sorted(set(kinds) - {"full_attention", "sliding_attention"})
            _require(p, not unknown, f"layer_types {unknown}")
            if any(banded):
                alternating = banded == [i % 2 == 1 for i in range(len(banded))]
                _require(p, alternating, f"layer_types {kinds} (gptjax bands every odd layer: full, sliding, ...)")
                fields.update(attention="alternating", window=int(hf["sliding_window"]))
        else:
            mlp_bias = bool(hf.get("mlp_bias", False))
            _require(p, attn_bias == mlp_bias, f"attention_bias={attn_bias} with mlp_bias={mlp_bias} (gptjax's "
                     "use_bias puts biases on both or neither)")
            fields["use_bias"] = attn_bias
        self._refuse(p)
        return ModelConfig(**fields)

    def tensors(self, cfg: ModelConfig) -> list[HFTensor]:
        d, h, k, hd, f, V = (cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.resolved_head_dim, cfg.d_ff,
                             cfg.vocab_size)
        out = [_identity("model.embed_tokens.weight", (V, d), "embedding")]
        for i in range(cfg.n_layers):
            pre = f"model.layers.{i}."
            b = "blocks.{}."
            out += [_identity(pre + "input_layernorm.weight", (d,), b + "attn_norm.scale", i),
                    _proj(pre + "self_attn.q_proj.weight", (d, h, hd), b + "attn.w_q", i),
                    _proj(pre + "self_attn.k_proj.weight", (d, k, hd), b + "attn.w_k", i),
                    _proj(pre + "self_attn.v_proj.weight", (d, k, hd), b + "attn.w_v", i),
                    _out_proj(pre + "self_attn.o_proj.weight", (h, hd, d), b + "attn.w_o", i)]
            if cfg.use_bias:
                out += [_bias(pre + f"self_attn.{n}_proj.bias", shape, b + f"attn.b_{n}", i, cfg.has_qkv_bias)
                        for n, shape in (("q", (h, hd)), ("k", (k, hd)), ("v", (k, hd)))]
                out.append(_identity(pre + "self_attn.o_proj.bias", (d,), b + "attn.b_o", i))
            if self.qk_norm:
                out += [_identity(pre + "self_attn.q_norm.weight", (hd,), b + "attn.q_norm.scale", i),
                        _identity(pre + "self_attn.k_norm.weight", (hd,), b + "attn.k_norm.scale", i)]
            out += [_identity(pre + "post_attention_layernorm.weight", (d,), b + "mlp_norm.scale", i),
                    _matrix_t(pre + "mlp.gate_proj.weight", (d, f), b + "mlp.w_gate", i),
                    _matrix_t(pre + "mlp.up_proj.weight", (d, f), b + "mlp.w_up", i),
                    _matrix_t(pre + "mlp.down_proj.weight", (f, d), b + "mlp.w_down", i)]
            if cfg.use_bias:
                out += [_zeros(pre + "mlp.gate_proj.bias", (f,), i),
                        _identity(pre + "mlp.up_proj.bias", (f,), b + "mlp.b_up", i),
                        _identity(pre + "mlp.down_proj.bias", (d,), b + "mlp.b_down", i)]
        out.append(_identity("model.norm.weight", (d,), "final_norm.scale"))
        if not cfg.tie_embeddings:
            out.append(_matrix_t("lm_head.weight", (d, V), "unembedding"))
        return out


class Qwen3(Llama):
    model_type, architecture = "qwen3", "Qwen3ForCausalLM"
    qk_norm = True

    def problems(self, cfg: ModelConfig) -> list[str]:
        p = super().problems(cfg)
        _require(p, not cfg.use_bias, "use_bias=true (Qwen3's MLP has no biases)")
        return p


# ---- GPT-2 and GPT-Neo ----------------------------------------------------------------------------------------
class GPT2(Family):
    model_type, architecture = "gpt2", "GPT2LMHeadModel"
    ignored_suffixes = ("attn.bias", "attn.masked_bias")
    attention = "dense"

    @staticmethod
    def _mlp_weight(name: str, src_shape, src: str, layer: int) -> HFTensor:
        """GPT-2's MLP is Conv1D, whose weight is [in, out] like gptjax's."""
        return _identity(name, src_shape, src, layer)

    def problems(self, cfg: ModelConfig) -> list[str]:
        p: list[str] = []
        arch = self.architecture
        _require(p, cfg.norm == "layernorm", f"norm={cfg.norm} ({arch} uses LayerNorm)")
        _require(p, cfg.mlp == "gelu", f"mlp={cfg.mlp} ({arch} uses a GELU MLP)")
        _require(p, cfg.kv_heads == cfg.n_heads, f"{cfg.attention_kind} attention, n_kv_heads={cfg.kv_heads} "
                 f"({arch} has multi-head attention only)")
        _require(p, cfg.resolved_head_dim * cfg.n_heads == cfg.d_model,
                 f"head_dim={cfg.resolved_head_dim} x n_heads={cfg.n_heads} != d_model={cfg.d_model} "
                 f"({arch} derives head_dim from d_model)")
        _require(p, not cfg.qk_norm, f"qk_norm=true ({arch} has no q/k norm)")
        _require(p, cfg.attention == self.attention,
                 f"attention={cfg.attention} ({arch} is {self.attention})")
        return p

    def hf_config(self, cfg: ModelConfig, eos_id: int, dtype: str) -> dict:
        return {**self._common(cfg, eos_id, dtype), "n_embd": cfg.d_model,
                "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len,
                "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0,
                "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}

    def model_config(self, hf: dict) -> ModelConfig:
        p = _gelu_problems(hf)
        _require(p, hf.get("scale_attn_weights", True), "scale_attn_weights=false")
        _require(p, not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=true")
        _require(p, not hf.get("add_cross_attention", False), "add_cross_attention=true")
        self._refuse(p)
        d = hf["n_embd"]
        return ModelConfig(vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
                           d_ff=_hf_value(hf, "n_inner", 4 * d), max_seq_len=hf["n_positions"], positions="learned",
                           norm="layernorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), mlp="gelu",
                           use_bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)))

    def tensors(self, cfg: ModelConfig) -> list[HFTensor]:
        d, V = cfg.d_model, cfg.vocab_size
        out = [_identity("transformer.wte.weight", (V, d), "embedding"),
               _identity("transformer.wpe.weight", (cfg.max_seq_len, d), "pos_embedding")]
        for i in range(cfg.n_layers):
            pre, b = f"transformer.h.{i}.", "blocks.{}."
            out += _layernorm(pre + "ln_1", d, b + "attn_norm", i)
            out += self._attention(cfg, pre, b, i)
            out += _layernorm(pre + "ln_2", d, b + "mlp_norm", i)
            out += self._mlp(cfg, pre, b, i)
        out += _layernorm("transformer.ln_f", d, "final_norm")
        if not cfg.tie_embeddings:
            out.append(_matrix_t("lm_head.weight", (d, V), "unembedding"))
        return out

    def _attention(self, cfg: ModelConfig, pre: str, b: str, i: int) -> list[HFTensor]:
        d, h, hd = cfg.d_model, cfg.n_heads, cfg.resolved_head_dim
        qkv = HFTensor(pre + "attn.c_attn.weight", (d, 3 * d), (b + "attn.w_q", b + "attn.w_k", b + "attn.w_v"),
                       lambda q, k, v: np.concatenate([x.reshape(d, d) for x in (q, k, v)], axis=1),
                       lambda w: tuple(x.reshape(d, h, hd) for x in np.split(w, 3, axis=1)), i)
        out = [qkv]
        if cfg.has_qkv_bias:
            out.append(HFTensor(pre + "attn.c_attn.bias", (3 * d,), (b + "attn.b_q", b + "attn.b_k", b + "attn.b_v"),
                                lambda q, k, v: np.concatenate([x.reshape(d) for x in (q, k, v)]),
                                lambda w: tuple(x.reshape(h, hd) for x in np.split(w, 3)), i))
        else:
            out.append(_zeros(pre + "attn.c_attn.bias", (3 * d,), i))
        out.append(HFTensor(pre + "attn.c_proj.weight", (d, d), (b + "attn.w_o",), lambda w: w.reshape(d, d),
                            lambda w: (w.reshape(h, hd, d),), i))
        out.append(_maybe_bias(cfg, pre + "attn.c_proj.bias", (d,), b + "attn.b_o", i))
        return out

    def _mlp(self, cfg: ModelConfig, pre: str, b: str, i: int) -> list[HFTensor]:
        d, f = cfg.d_model, cfg.d_ff
        return [self._mlp_weight(pre + "mlp.c_fc.weight", (d, f), b + "mlp.w_up", i),
                _maybe_bias(cfg, pre + "mlp.c_fc.bias", (f,), b + "mlp.b_up", i),
                self._mlp_weight(pre + "mlp.c_proj.weight", (f, d), b + "mlp.w_down", i),
                _maybe_bias(cfg, pre + "mlp.c_proj.bias", (d,), b + "mlp.b_down", i)]


class GPTNeo(GPT2):
    model_type, architecture = "gpt_neo", "GPTNeoForCausalLM"
    ignored_suffixes = ("attn.attention.bias", "attn.attention.masked_bias")
    attention = "alternating"

    @staticmethod
    def _mlp_weight(name: str, src_shape, src: str, layer: int) -> HFTensor:
        """GPT-Neo's MLP is nn.Linear: [out, in]."""
        return _matrix_t(name, src_shape, src, layer)

    def problems(self, cfg: ModelConfig) -> list[str]:
        p = super().problems(cfg)
        _require(p, not cfg.has_qkv_bias, "q/k/v biases (use_bias=true with qkv_bias unset or true; GPT-Neo's "
                 "q/k/v projections have none: set model.qkv_bias=false)")
        return p

    def hf_config(self, cfg: ModelConfig, eos_id: int, dtype: str) -> dict:
        n = cfg.n_layers
        types = [[["global", "local"], n // 2]] + ([[["global"], 1]] if n % 2 else [])
        return {**self._common(cfg, eos_id, dtype), "hidden_size": cfg.d_model,
                "num_layers": n, "num_heads": cfg.n_heads, "intermediate_size": cfg.d_ff,
                "max_position_embeddings": cfg.max_seq_len, "attention_types": types,
                "window_size": min(cfg.window, cfg.max_seq_len), "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "resid_dropout": 0.0, "embed_dropout": 0.0,
                "attention_dropout": 0.0}

    def model_config(self, hf: dict) -> ModelConfig:
        p = _gelu_problems(hf)
        n = hf["num_layers"]
        layers = [kind for pattern, repeat in hf["attention_types"] for _ in range(repeat) for kind in pattern]
        expected = ["global" if i % 2 == 0 else "local" for i in range(n)]
        attention = "alternating"
        if layers == ["global"] * n:
            attention = "dense"
        else:
            _require(p, layers == expected, f"attention_types {hf['attention_types']} (gptjax alternates "
                     "global, local, ... starting with global)")
        self._refuse(p)
        d = hf["hidden_size"]
        return ModelConfig(vocab_size=hf["vocab_size"], d_model=d, n_layers=n, n_heads=hf["num_heads"],
                           d_ff=_hf_value(hf, "intermediate_size", 4 * d), max_seq_len=hf["max_position_embeddings"],
                           positions="learned", norm="layernorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                           mlp="gelu", use_bias=True, qkv_bias=False, attention=attention,
                           window=int(hf.get("window_size", 256)),
                           tie_embeddings=bool(hf.get("tie_word_embeddings", True)))

    def _attention(self, cfg: ModelConfig, pre: str, b: str, i: int) -> list[HFTensor]:
        d, h, hd = cfg.d_model, cfg.n_heads, cfg.resolved_head_dim
        pre = pre + "attn.attention."
        # GPT-Neo's scores are q.k with no 1/sqrt(head_dim): the factor goes into q_proj (exact in float32 when
        # sqrt(head_dim) is a power of two).
        scale, unscale = np.float32(1 / math.sqrt(hd)), np.float32(math.sqrt(hd))
        q = HFTensor(pre + "q_proj.weight", (d, d), (b + "attn.w_q",),
                     lambda w: (w.astype(np.float32) * scale).reshape(d, d).T,
                     lambda w: ((w.astype(np.float32) * unscale).T.reshape(d, h, hd),), i)
        return [q, _proj(pre + "k_proj.weight", (d, h, hd), b + "attn.w_k", i),
                _proj(pre + "v_proj.weight", (d, h, hd), b + "attn.w_v", i),
                _out_proj(pre + "out_proj.weight", (h, hd, d), b + "attn.w_o", i),
                _maybe_bias(cfg, pre + "out_proj.bias", (d,), b + "attn.b_o", i)]


# ---- tensor helpers -------------------------------------------------------------------------------------------
def _proj(name: str, src_shape, src: str, layer: int) -> HFTensor:
    """q/k/v: gptjax [d, heads, head_dim] -> nn.Linear [heads * head_dim, d]."""
    d, n, hd = src_shape
    return HFTensor(name, (n * hd, d), (src,), lambda w: w.reshape(d, n * hd).T,
                    lambda w: (w.T.reshape(d, n, hd),), layer)


def _out_proj(name: str, src_shape, src: str, layer: int) -> HFTensor:
    """attention output: gptjax [heads, head_dim, d] -> nn.Linear [d, heads * head_dim]."""
    n, hd, d = src_shape
    return HFTensor(name, (d, n * hd), (src,), lambda w: w.reshape(n * hd, d).T,
                    lambda w: (w.T.reshape(n, hd, d),), layer)


def _matrix_t(name: str, src_shape, src: str, layer: int | None = None) -> HFTensor:
    """gptjax [in, out] -> nn.Linear [out, in]."""
    a, b = src_shape
    return HFTensor(name, (b, a), (src,), lambda w: w.T, lambda w: (w.T,), layer)


def _bias(name: str, src_shape, src: str, layer: int, present: bool) -> HFTensor:
    """A per-head projection bias [heads, head_dim] -> [heads * head_dim] (zeros where gptjax has none)."""
    n, hd = src_shape
    if not present:
        return _zeros(name, (n * hd,), layer)
    return HFTensor(name, (n * hd,), (src,), lambda w: w.reshape(n * hd), lambda w: (w.reshape(n, hd),), layer)


def _maybe_bias(cfg: ModelConfig, name: str, shape, src: str, layer: int) -> HFTensor:
    return _identity(name, shape, src, layer) if cfg.use_bias else _zeros(name, shape, layer)


def _layernorm(prefix: str, d: int, src: str, layer: int | None = None) -> list[HFTensor]:
    return [_identity(prefix + ".weight", (d,), src + ".scale", layer),
            _identity(prefix + ".bias", (d,), src + ".bias", layer)]


# ---- selection ------------------------------------------------------------------------------------------------
FAMILIES: dict[str, Family] = {f.model_type: f for f in (Llama(), Qwen3(), GPT2(), GPTNeo())}


def type_name(cfg: ModelConfig) -> str:
    """The HF ``model_type`` gptjax exports ``cfg`` as (before checking it fits)."""
    if cfg.positions == "rope":
        return "qwen3" if cfg.qk_norm else "llama"
    return "gpt_neo" if cfg.attention == "alternating" else "gpt2"


def family_for(cfg: ModelConfig) -> Family:
    """The HF family of ``cfg``, or ``UnsupportedArchitecture`` naming every feature it cannot express."""
    family = FAMILIES[type_name(cfg)]
    problems = family.problems(cfg)
    if problems:
        raise UnsupportedArchitecture(
            f"this model has no exact Hugging Face counterpart: as {family.architecture} (chosen by "
            f"positions={cfg.positions}, qk_norm={cfg.qk_norm}, attention={cfg.attention}) it would differ in: "
            + "; ".join(problems))
    return family


def family_of_hf(hf: dict) -> Family:
    """The family of an HF ``config.json``, or ``UnsupportedArchitecture`` naming its model type."""
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise UnsupportedArchitecture(
            f"model_type {kind!r} (architectures {hf.get('architectures')}) is not one gptjax imports; supported: "
            + ", ".join(f"{k} ({f.architecture})" for k, f in FAMILIES.items()))
    return FAMILIES[kind]

