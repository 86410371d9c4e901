import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import nano_model
from gptjax.model import Decoder, count_params, flops_per_token, param_counts
from gptjax.model.decoder import stack_layers, unstack_layers
from gptjax.model.attention import Attention, MaskSpec, causal_mask
from gptjax.model.layers import apply_rope, rope_angles
from gptjax.model.ops import einsum
from gptjax.config import model_preset


def build(cfg, seed=0):
    graphdef, state = nnx.split(Decoder(cfg, nnx.Rngs(seed)))
    return graphdef, state.to_pure_dict()


def logits(graphdef, params, tokens):
    return nnx.merge(graphdef, params)(tokens)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 24)), jnp.int32)

VARIANTS = {
    "llama": {},
    "gpt2": dict(positions="learned", norm="layernorm", mlp="gelu", use_bias=True),
    "gpt3-banded": dict(positions="learned", norm="layernorm", mlp="gelu", attention="alternating", window=5),
    "mqa-untied-qknorm": dict(n_kv_heads=1, tie_embeddings=False, qk_norm=True, z_loss=1e-4),
}
MUP_WIDE = dict(parametrization="mup", mup_base_width=32)  # nano's d_model 64: width multiplier 2


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causality_future_tokens_never_change_earlier_logits(variant):
    g, p = build(nano_model(**VARIANTS[variant]))
    base = logits(g, p, TOKENS)
    t = 13
    changed = TOKENS.at[:, t].set((TOKENS[:, t] + 7) % 512)
    out = logits(g, p, changed)
    np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))
    assert not np.allclose(out[:, t:], base[:, t:])  # the change is visible from t on


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_param_count_matches_analytic(variant):
    cfg = nano_model(**VARIANTS[variant])
    _, p = build(cfg)
    assert sum(x.size for x in jax.tree.leaves(p)) == count_params(cfg)


def _expand_kv_to_mha(params, groups):
    """MHA params equivalent to GQA params: each key/value head repeated for its query heads."""
    params = jax.tree.map(lambda x: x, params)
    for layer in params["blocks"].values():  # unrolled layout: blocks/<i>/attn/w_k is [D, K, H]
        for name in ("w_k", "w_v"):
            layer["attn"][name] = jnp.repeat(layer["attn"][name], groups, axis=1)
    return params


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_gqa_and_mqa_equal_mha_with_shared_kv(kv_heads):
    cfg = nano_model(n_heads=4, n_kv_heads=kv_heads)
    g, p = build(cfg)
    g_mha, _ = build(nano_model(n_heads=4, n_kv_heads=4))
    out = logits(g, p, TOKENS)
    out_mha = logits(g_mha, _expand_kv_to_mha(p, 4 // kv_heads), TOKENS)
    np.testing.assert_allclose(out, out_mha, atol=1e-5, rtol=1e-5)


def test_kv_heads_equal_heads_is_mha_default():
    g1, p1 = build(nano_model(n_heads=4, n_kv_heads=None))
    g2, p2 = build(nano_model(n_heads=4, n_kv_heads=4))
    np.testing.assert_array_equal(logits(g1, p1, TOKENS), logits(g2, p2, TOKENS))


def test_rope_dot_products_depend_only_on_relative_position():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def score(m, n):
        cq, sq = rope_angles(jnp.array([m]), 16, 10000.0)
        ck, sk = rope_angles(jnp.array([n]), 16, 10000.0)
        return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(0, 0) == pytest.approx(score(50, 50), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)
    # rotation preserves norms
    c, s = rope_angles(jnp.array([37]), 16, 10000.0)
    assert float(jnp.linalg.norm(apply_rope(q, c, s))) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-5)


def test_banded_mask_is_exactly_the_window():
    m = np.asarray(causal_mask(10, 10, 3))
    for i in range(10):
        for j in range(10):
            assert m[i, j] == (i - 3 < j <= i), (i, j)
    assert np.array_equal(np.asarray(causal_mask(10, 10, 10)), np.tril(np.ones((10, 10), bool)))


def test_banded_attention_ignores_keys_outside_window():
    cfg = nano_model(attention="alternating", window=4)
    attn = Attention(cfg, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 16, cfg.d_model))
    rope = rope_angles(jnp.arange(16), cfg.resolved_head_dim, cfg.rope_theta)
    run = lambda x, window: attn(x, window, rope, MaskSpec())[0]
    base = run(x, 4)
    i = 12
    far = run(x.at[:, i - 4].add(1.0), 4)  # outside the window of query i
    near = run(x.at[:, i - 3].add(1.0), 4)  # inside it
    np.testing.assert_array_equal(np.asarray(far[:, i]), np.asarray(base[:, i]))
    assert not np.allclose(near[:, i], base[:, i])
    dense = run(x.at[:, i - 4].add(1.0), 16)
    assert not np.allclose(dense[:, i], base[:, i])


def test_preset_parameter_counts_match_published_totals():
    assert count_params(model_preset("gpt2-small")) == 124_439_808
    assert count_params(model_preset("llama2-7b")) == 6_738_415_616
    assert count_params(model_preset("llama2-13b")) == 13_015_864_320
    assert count_params(model_preset("llama2-70b")) == 68_976_648_192
    assert round(count_params(model_preset("gpt3-175b")) / 1e9) == 175
    assert round(count_params(model_preset("gpt3-1.3b")) / 1e8) == 13
    assert param_counts(model_preset("gpt2-small"))["unembedding"] == 0


def test_flops_per_token_formula():
    cfg = nano_model()
    # matmul params: per layer attn 64*16*(4+2*2) + 4*16*64 = 12288, mlp 3*64*128 = 24576; + unembed 512*64
    n = 2 * (12288 + 24576) + 512 * 64
    attn = 2 * 12 * 4 * 16 * 64
    assert flops_per_token(cfg, 64) == 6 * n + attn
    banded = nano_model(attention="alternating", window=8)
    assert flops_per_token(banded, 64) == 6 * n + 12 * 4 * 16 * (64 + 8)


def test_scan_and_unrolled_layers_agree_and_remat_keeps_gradients():
    tokens = TOKENS[:, :16]
    g_scan, p_scan = build(nano_model(scan_layers=True))
    assert p_scan["blocks"]["attn"]["w_q"].shape[0] == 2  # stacked on a leading layer axis
    p_unrolled = unstack_layers(p_scan, 2)
    assert p_unrolled["blocks"][1]["attn"]["w_q"].shape == (64, 4, 16)
    jax.tree.map(np.testing.assert_array_equal, stack_layers(p_unrolled), p_scan)
    ref = logits(g_scan, p_scan, tokens)
    ref_grad = unstack_layers(jax.grad(lambda p: jnp.mean(logits(g_scan, p, tokens) ** 2))(p_scan), 2)
    for kw in (dict(scan_layers=False), dict(scan_layers=True, remat="full"),
               dict(scan_layers=False, remat="save_dots"), dict(scan_layers=True, remat="save_dots")):
        g, _ = build(nano_model(**kw))
        p = p_scan if kw["scan_layers"] else p_unrolled
        np.testing.assert_allclose(logits(g, p, tokens), ref, atol=1e-5)
        grad = jax.grad(lambda p: jnp.mean(logits(g, p, tokens) ** 2))(p)
        grad = unstack_layers(grad, 2) if kw["scan_layers"] else grad
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), grad, ref_grad)


def test_custom_einsum_vjp_matches_autodiff():
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(2, 5, 3, 4)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(2, 6, 3, 4)), jnp.float32)
    spec = "blkh,bmkh->bklm"
    f_ours = lambda a, b: jnp.sum(jnp.sin(einsum(spec, a, b, jnp.float32)))
    f_ref = lambda a, b: jnp.sum(jnp.sin(jnp.einsum(spec, a, b)))
    for x, y in zip(jax.grad(f_ours, (0, 1))(a, b), jax.grad(f_ref, (0, 1))(a, b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="summed alone"):
        einsum("ij,jk->k", a[0, 0], b[0, 0].T, jnp.float32)


def test_bfloat16_compute_tracks_float32():
    g32, p = build(nano_model())
    g16, _ = build(nano_model(dtype="bfloat16"))
    out32, out16 = logits(g32, p, TOKENS), logits(g16, p, TOKENS)
    assert out16.dtype == jnp.float32  # logits (and so softmax/loss) stay float32
    assert float(jnp.max(jnp.abs(out32 - out16))) < 0.05
    loss = lambda g: lambda p: jnp.mean(jax.nn.logsumexp(logits(g, p, TOKENS), -1))
    g_32, g_16 = jax.grad(loss(g32))(p), jax.grad(loss(g16))(p)
    cos = [float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-12))
           for a, b in zip(jax.tree.leaves(g_32), jax.tree.leaves(g_16))]
    assert min(cos) > 0.98


def test_custom_softmax_matches_jax():
    from gptjax.model.ops import softmax

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 5, 7)) * 3, jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32)
    np.testing.assert_allclose(softmax(x), jax.nn.softmax(x), rtol=1e-6, atol=1e-7)
    g1 = jax.grad(lambda x: jnp.sum(softmax(x) * w))(x)
    g2 = jax.grad(lambda x: jnp.sum(jax.nn.softmax(x) * w))(x)
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)
    # a fully masked entry (additive -max-float mask) gets probability 0 and no gradient
    masked = x.at[..., 0].add(jnp.finfo(jnp.float32).min)
    assert float(jnp.max(softmax(masked)[..., 0])) == 0.0


# ---- the model API: positions, segment ids, KV cache -----------------------------------------------------------
API_VARIANTS = {
    "llama-gqa": {},
    "gpt2-learned": dict(positions="learned", norm="layernorm", mlp="gelu", use_bias=True),
    "gpt3-banded-scan": dict(positions="learned", norm="layernorm", mlp="gelu", attention="alternating", window=5,
                             scan_layers=True),
    "mqa-qknorm-untied-scan": dict(n_kv_heads=1, qk_norm=True, tie_embeddings=False, scan_layers=True),
}


def test_default_positions_are_explicit_arange():
    for kw in (dict(), dict(positions="learned")):
        model = Decoder(nano_model(**kw), nnx.Rngs(0))
        positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
        # default positions read host-computed rotary tables, explicit ones compute them in the program: the
        # two cos / sin implementations may differ by an ulp (learned positions are bit-identical)
        np.testing.assert_allclose(model(TOKENS), model(TOKENS, positions), atol=1e-5, rtol=0)
        stretched = model(TOKENS, positions * 2)  # relative distances change, for RoPE and learned positions alike
        assert not np.allclose(stretched, model(TOKENS), atol=1e-4)


def test_rope_positions_shift_invariance():
    """RoPE attends by relative position: the same tokens at positions shifted by a constant give the same logits."""
    model = Decoder(nano_model(), nnx.Rngs(0))
    positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
    np.testing.assert_allclose(model(TOKENS, positions + 17), model(TOKENS, positions), atol=2e-5)


@pytest.mark.parametrize("variant", list(API_VARIANTS))
def test_packed_documents_give_each_documents_own_logits(variant):
    cfg = nano_model(**API_VARIANTS[variant])
    model = Decoder(cfg, nnx.Rngs(0))
    rng = np.random.default_rng(3)
    lengths = [(7, 10, 7), (12, 12, 0)]  # two rows, each packing up to three documents into 24 tokens
    docs = [[rng.integers(0, 512, n) for n in row if n] for row in lengths]
    tokens = np.stack([np.concatenate(row) for row in docs]).astype(np.int32)
    segments = np.stack([np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(row)]) for row in docs])
    positions = np.stack([np.concatenate([np.arange(len(d)) for d in row]) for row in docs])
    packed = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments))
    for r, row in enumerate(docs):
        start = 0
        for doc in row:
            alone = model(jnp.asarray(doc[None], jnp.int32))[0]
            np.testing.assert_allclose(packed[r, start:start + len(doc)], alone, atol=2e-5, rtol=1e-5)
            start += len(doc)
    unmasked = model(jnp.asarray(tokens), jnp.asarray(positions))
    assert not np.allclose(unmasked[0, 7:17], packed[0, 7:17], atol=1e-3)  # without segments they would mix


@pytest.mark.parametrize("variant", list(API_VARIANTS))
def test_kv_cache_decoding_equals_the_full_forward_pass(variant):
    cfg = nano_model(**API_VARIANTS[variant])
    model = Decoder(cfg, nnx.Rngs(0))
    full = model(TOKENS)
    cache = model.init_cache(batch=2, slots=32)
    # prefill 9 tokens, a chunk of 3, then one token at a time
    logits, cache = model.decode(TOKENS[:, :9], cache)
    np.testing.assert_allclose(logits, full[:, :9], atol=2e-5, rtol=1e-5)
    logits, cache = model.decode(TOKENS[:, 9:12], cache)
    np.testing.assert_allclose(logits, full[:, 9:12], atol=2e-5, rtol=1e-5)
    step = jax.jit(lambda t, c: nnx.merge(*nnx.split(model)).decode(t, c))
    for t in range(12, 24):
        logits, cache = step(TOKENS[:, t:t + 1], cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=2e-5, rtol=1e-5)
    assert int(cache.index) == 24 and len(cache.k_BxKxHxS) == len(cache.v_BxKxSxH) == 2
    assert cache.k_BxKxHxS[0].shape == (2, cfg.kv_heads, cfg.resolved_head_dim, 32)
    assert cache.v_BxKxSxH[0].shape == (2, cfg.kv_heads, 32, cfg.resolved_head_dim)


@pytest.mark.parametrize("variant", ["llama-gqa", "gpt2-learned", "banded-scan"])
def test_a_per_row_cache_decodes_each_row_at_its_own_length(variant):
    """An index per row (continuous batching, speculative decoding): rows at different lengths, fed one token or
    several at a time, each get the logits of their own sequence's full forward pass; rewinding a row (setting its
    index back) makes the slots after it free again."""
    from gptjax.model.cache import KVCache

    cfg = nano_model(**{"llama-gqa": {}, "gpt2-learned": dict(positions="learned", norm="layernorm", mlp="gelu",
                                                              n_kv_heads=None),
                        "banded-scan": dict(attention="alternating", window=4, scan_layers=True)}[variant])
    model = Decoder(cfg, nnx.Rngs(0))
    full = model(TOKENS)
    cache = KVCache.init(cfg, 2, 32, per_row=True)
    _, cache = model.decode(TOKENS[:, :6], cache)
    cache = dataclasses.replace(cache, index=jnp.asarray([6, 3], jnp.int32))  # row 1 rewound to 3 tokens
    pos = np.asarray([6, 3])
    for width in (1, 3, 1, 2):  # single steps and multi-token (verify) steps, each row at its own slot
        feed = np.stack([np.asarray(TOKENS[r, p:p + width]) for r, p in enumerate(pos)])
        logits, cache = model.decode(jnp.asarray(feed), cache)
        for r, p in enumerate(pos):
            np.testing.assert_allclose(logits[r], full[r, p:p + width], atol=2e-5, rtol=1e-5)
        pos = pos + width
    np.testing.assert_array_equal(cache.index, pos)


def test_kv_cache_with_segments_and_left_padding():
    """Rows of different prompt lengths, left-padded (segment 0, never attended by the real tokens), with
    positions starting at 0 at each row's first real token: each row decodes as if it were alone."""
    cfg = nano_model()
    model = Decoder(cfg, nnx.Rngs(0))
    prompts = [np.arange(5, 11), np.arange(20, 24)]  # 6 and 4 tokens
    pad = 6
    tokens = np.zeros((2, pad), np.int32)
    segments = np.zeros((2, pad), np.int32)
    positions = np.zeros((2, pad), np.int32)
    for r, p in enumerate(prompts):
        tokens[r, pad - len(p):], segments[r, pad - len(p):], positions[r, pad - len(p):] = p, 1, np.arange(len(p))
    cache = model.init_cache(2, 16)
    logits, cache = model.decode(jnp.asarray(tokens), cache, jnp.asarray(positions), jnp.asarray(segments))
    nxt = jnp.asarray([[7], [9]], jnp.int32)
    step_logits, _ = model.decode(nxt, cache, jnp.asarray([[6], [4]]), jnp.ones((2, 1), jnp.int32))
    for r, p in enumerate(prompts):
        alone = model(jnp.asarray(np.concatenate([p, np.asarray(nxt[r])])[None], jnp.int32))[0]
        np.testing.assert_allclose(logits[r, pad - len(p):], alone[:-1], atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(step_logits[r, 0], alone[-1], atol=2e-5, rtol=1e-5)


def test_weight_decay_is_parameter_metadata():
    """Decided where each parameter is made: matrices decay; norms, biases, token / position embeddings do not;
    an untied output matrix does. The stacked (scan) layout keeps the decision despite its extra layer axis."""
    from gptjax.model.layers import param_metadata

    for kw in (dict(), dict(tie_embeddings=False, use_bias=True, positions="learned", norm="layernorm",
                             scan_layers=True)):
        decay = param_metadata(nnx.state(Decoder(nano_model(**kw), nnx.Rngs(0))), "weight_decay")
        blocks = decay["blocks"] if kw.get("scan_layers") else decay["blocks"][0]
        assert blocks["attn"]["w_q"] and blocks["attn"]["w_o"] and blocks["mlp"]["w_up"] and blocks["mlp"]["w_down"]
        assert not decay["embedding"] and not decay["final_norm"]["scale"] and not blocks["attn_norm"]["scale"]
        if kw:
            assert decay["unembedding"] and not decay["pos_embedding"]
            assert not blocks["mlp"]["b_up"] and not blocks["attn"]["b_q"] and not blocks["mlp_norm"]["bias"]


@pytest.mark.parametrize("mlp, norm", [("swiglu", "rmsnorm"), ("gelu", "layernorm")])
def test_a_block_keeps_only_its_inputs_matmul_inputs_and_attention_output_for_backward(mlp, norm):
    """What one block saves for the backward pass, counted in activation-sized arrays: the norms and the MLP
    activation are recomputed, so d_ff-sized residuals are the up projections alone (2 for SwiGLU, 1 for GELU)
    and the rest is x, the two norm outputs, the residual sum, q, k, v and the attention output (8)."""
    import contextlib
    import io
    import re

    from jax.ad_checkpoint import print_saved_residuals

    from gptjax.model.decoder import Block
    from gptjax.model.kernels import MaskSpec
    from gptjax.model.layers import rope_angles

    cfg = nano_model(mlp=mlp, norm=norm, d_ff=96, n_kv_heads=4, attention_impl="blockwise", attention_block=16,
                     max_seq_len=64)
    graphdef, state = nnx.split(Block(cfg, nnx.Rngs(0)))
    rope = rope_angles(64, cfg.resolved_head_dim, cfg.rope_theta)

    def f(state, x):
        return nnx.merge(graphdef, state)(x, jnp.int32(64), rope, MaskSpec(0, None, None))[0].sum()

    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the public API prints one "dtype[shape] why" line per residual
        print_saved_residuals(f, state, jnp.ones((2, 64, 64)))
    sizes = [int(np.prod([int(d) for d in m.group(1).split(",") if d]))
             for line in out.getvalue().splitlines() if "argument state" not in line
             for m in [re.match(r"\w+\[([\d,]*)\]", line.strip())] if m]
    # On CPU the attention kernel runs as two lanes, so q / k / v are kept as two halves each; the attention
    # output is listed twice, as the kernel's [B, K, G, L, H] and the projection's [B, N, L, H] reshape of it
    # (merging adjacent axes: one buffer in XLA).
    assert sum(s == 2 * 64 * 96 for s in sizes) == (2 if mlp == "swiglu" else 1), sizes
    assert sum(s for s in sizes if s >= 64 * 64 and s != 2 * 64 * 96) == 9 * 2 * 64 * 64, sizes


@pytest.mark.parametrize("variant", ["llama", "mqa-untied-qknorm", "mup"])
def test_fused_loss_equals_the_logits_loss_with_its_gradients(variant):
    """``loss_chunk`` never forms the [B, L, V] logits and makes the gradient in the forward pass: the same loss,
    z-loss, token count and gradients as the plain path, with a loss mask and a length (24) no chunk of 10
    divides; and evaluation (no gradient) takes the scan-only primal."""
    from gptjax.model import ShardedModel
    from gptjax.sharding import make_mesh
    from gptjax.config import MeshConfig
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    cfg = nano_model(**{**VARIANTS.get(variant, MUP_WIDE), "z_loss": 1e-3})
    plain, fused = ShardedModel(cfg, mesh), ShardedModel(dataclasses.replace(cfg, loss_chunk=10), mesh)
    params = plain.init_params(jax.random.key(0))
    mask = jnp.asarray(np.random.default_rng(1).random(TOKENS.shape) > 0.25)
    batch = {"inputs": TOKENS, "targets": jnp.roll(TOKENS, -1, axis=1), "loss_mask": mask}
    (l0, a0), g0 = jax.value_and_grad(plain.loss, has_aux=True)(params, batch)
    (l1, a1), g1 = jax.jit(jax.value_and_grad(fused.loss, has_aux=True))(params, batch)
    assert float(l1) == pytest.approx(float(l0), rel=1e-6)
    for k in ("loss", "z_loss", "nll_sum", "tokens"):
        assert float(a1[k]) == pytest.approx(float(a0[k]), rel=1e-6), k
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g1, g0)
    assert float(fused.eval_step(params, batch)["loss"]) == pytest.approx(float(a0["loss"]), rel=1e-6)


def test_mup_at_its_base_width_is_the_standard_model_and_scales_by_role_above_it():
    """μP is relative to ``mup_base_width``: there, the same parameters, logits and optimizer as the standard
    parametrization; at 4x the width, hidden matrices are initialised 1/sqrt(4) as wide and get a quarter of the
    learning rate, embeddings / norms keep theirs, the logits are divided by 4 (``Decoder.head`` too)."""
    from gptjax.model import ShardedModel
    from gptjax.sharding import single_device_mesh

    std, mup = nano_model(d_model=64), nano_model(d_model=64, parametrization="mup", mup_base_width=64)
    g0, p0 = build(std)
    g1, p1 = build(mup)
    jax.tree.map(np.testing.assert_array_equal, p0, p1)
    np.testing.assert_array_equal(logits(g0, p0, TOKENS), logits(g1, p1, TOKENS))
    assert ShardedModel(std, single_device_mesh()).lr_multipliers is None
    assert set(jax.tree.leaves(ShardedModel(mup, single_device_mesh()).lr_multipliers)) == {1.0}

    wide = nano_model(d_model=256, d_ff=1024, parametrization="mup", mup_base_width=64)
    g, p = build(wide)
    m = ShardedModel(wide, single_device_mesh())
    mult = m.lr_multipliers
    assert mult["blocks"][0]["mlp"]["w_up"] == mult["blocks"][0]["attn"]["w_q"] == 0.25
    assert mult["embedding"] == mult["blocks"][0]["attn_norm"]["scale"] == mult["final_norm"]["scale"] == 1.0
    up = np.asarray(p["blocks"][0]["mlp"]["w_up"])
    assert np.std(up) == pytest.approx(wide.init_std / 2, rel=0.02)  # / sqrt(m), m = 4
    assert np.std(np.asarray(p["embedding"])) == pytest.approx(wide.init_std, rel=0.02)
    model = nnx.merge(g, p)
    hidden = model.hidden(TOKENS)
    head, _ = model.head()
    np.testing.assert_allclose(model(TOKENS), jnp.einsum("bld,vd->blv", hidden, head), rtol=2e-4, atol=2e-6)
    np.testing.assert_allclose(head, np.asarray(p["embedding"]) / 4)
