"""Attention kernels: the blockwise kernel (and the cuDNN / splash plumbing) against the dense one, tile skipping,
kernel selection, and memory that grows linearly with the sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import nano_model
from gptjax.config import ConfigError, ModelConfig
from gptjax.model import flash
from gptjax.model.decoder import Decoder
from gptjax.model.kernel_api import KernelOptions, MaskSpec, causal_mask
from gptjax.model.kernels import (DENSE_MAX_LEN_CPU, KERNELS, balanced_block, choose_kernel, cudnn_attention,
                                  dense_attention, splash_attention)
from gptjax.sharding.context import ContextLayout
from flax import nnx

# fp32: the blockwise kernel sums in another order than the dense one; measured differences are ~1e-6
ATOL = 2e-5


def qkv(B, K, G, L, S, H, seed=0, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    q = r.normal(size=(B, K, G, L, H)) / np.sqrt(H)
    k, v = r.normal(size=(B, K, S, H)), r.normal(size=(B, K, S, H))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def both(q, k, v, window, mask, block_q, block_k, lanes=1):
    """(blockwise, dense) outputs and their VJPs for one random cotangent."""
    mask = mask.with_window(window)
    blockwise = lambda q, k, v: flash.blockwise_attention(q, k, v, mask, KernelOptions(block_q=block_q,
                                                                                       block_k=block_k, lanes=lanes))
    dense = lambda q, k, v: dense_attention(q, k, v, mask, KernelOptions())
    return [output_and_grads(f, q, k, v) for f in (blockwise, dense)]


def output_and_grads(f, q, k, v):
    """``f(q, k, v)`` and its VJP for a fixed random cotangent."""
    ct = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    o, vjp = jax.vjp(jax.jit(f), q, k, v)
    return o, vjp(ct)


def segments(B, L, n, seed=0):
    return jnp.asarray(np.sort(np.random.default_rng(seed).integers(0, n, (B, L)), axis=1), jnp.int32)


CASES = {  # name: (K, G, L, window, segments, block_q, block_k)
    "causal MHA, blocks divide": (4, 1, 64, 64, False, 16, 16),
    "causal GQA, blocks do not divide": (2, 2, 70, 70, False, 16, 32),
    "causal MQA, one block": (1, 4, 50, 50, False, 64, 64),
    "banded GQA": (2, 2, 70, 9, False, 32, 16),
    "banded, window = block": (2, 1, 96, 16, False, 16, 16),
    "segments GQA": (2, 2, 70, 70, True, 16, 16),
    "banded + segments, tiny window": (3, 1, 100, 4, True, 64, 50),
}


@pytest.mark.parametrize("name", list(CASES))
def test_blockwise_matches_dense_outputs_and_gradients(name):
    K, G, L, window, seg, bq, bk = CASES[name]
    q, k, v = qkv(2, K, G, L, L, 8)
    ids = segments(2, L, 3) if seg else None
    (o1, g1), (o2, g2) = both(q, k, v, window, MaskSpec(0, ids, ids), bq, bk)
    np.testing.assert_allclose(o1, o2, atol=ATOL, rtol=0)
    for a, b, what in zip(g1, g2, "qkv"):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0, err_msg=f"d{what}")
    assert float(jnp.abs(o2).max()) > 0.1 and all(float(jnp.abs(g).max()) > 0.1 for g in g2)  # not trivially 0


RING_CASES = {  # name: (K, G, slice length, window, segments, block, zig-zag layout)
    "causal GQA, blocks do not divide": (2, 2, 17, 68, False, 5, False),
    "causal MQA, one block a slice": (1, 3, 12, 48, False, 16, False),
    "banded, window inside a slice": (2, 2, 17, 5, False, 4, False),
    "banded, window across slices": (1, 2, 10, 23, False, 4, False),
    "banded + segments": (2, 1, 15, 9, True, 4, False),
    "zig-zag causal GQA, blocks do not divide": (2, 2, 18, 72, False, 4, True),
    "zig-zag banded, window across chunks": (1, 2, 10, 13, False, 4, True),
    "zig-zag banded + segments": (2, 1, 16, 9, True, 4, True),
}


@pytest.mark.parametrize("name", list(RING_CASES))
def test_ring_attention_matches_dense_outputs_and_gradients(name):
    """The sequence split over 4 devices, key / value slices passed around the ring (gptjax.model.ring): the
    dense kernel's output and gradients on one device. Padded keys of an earlier slice (blocks that do not
    divide a slice) sit before the queries and must be masked explicitly. In the zig-zag layout the sequence is
    reordered before the split (device d holds chunks d and 7 - d of 8) and the output restored after it."""
    from jax.sharding import PartitionSpec as P
    from gptjax.model.ring import ring_attention

    K, G, per, window, seg, block, zigzag = RING_CASES[name]
    C = 4
    L = C * per
    q, k, v = qkv(2, K, G, L, L, 8)
    ids = segments(2, L, 5) if seg else None
    mesh = jax.make_mesh((C,), ("context",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:C])
    layout = ContextLayout(("context",), C, "zigzag" if zigzag else "ring")
    order = layout.order(L) if zigzag else np.arange(L)
    assert sorted(order) == list(range(L))

    def body(q, k, v, ids):
        return ring_attention(q, k, v, MaskSpec(0, ids, ids, window=window, context=layout),
                              KernelOptions(block_q=block, block_k=block))

    q_spec, kv_spec = P(None, None, None, "context"), P(None, None, "context")
    seg_spec = None if ids is None else P(None, "context")
    ring = jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec)

    def laid_out(q, k, v):
        o = ring(q[:, :, :, order], k[:, :, order], v[:, :, order], None if ids is None else ids[:, order])
        return o[:, :, :, np.argsort(order)]

    o1, g1 = output_and_grads(laid_out, q, k, v)
    o2, g2 = output_and_grads(lambda q, k, v: dense_attention(q, k, v, MaskSpec(0, ids, ids, window=window),
                                                              KernelOptions()), q, k, v)
    np.testing.assert_allclose(o1, o2, atol=ATOL, rtol=0)
    for a, b, what in zip(g1, g2, "qkv"):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0, err_msg=f"d{what}")
    assert float(jnp.abs(o2).max()) > 0.1 and all(float(jnp.abs(g).max()) > 0.1 for g in g2)  # not trivially 0


def _bytes_passed(jaxpr, times=1) -> int:
    """Bytes every device sends to its ring neighbour (``ppermute``) when ``jaxpr`` runs: each exchange times
    the trip count of the loops around it."""
    total = 0
    for e in jaxpr.eqns:
        assert not (e.primitive.name == "while" and "ppermute" in str(e)), "an exchange in a loop of unknown length"
        n = times * (e.params["length"] if e.primitive.name == "scan" else 1)
        if e.primitive.name == "ppermute":
            total += n * sum(x.aval.size * x.aval.dtype.itemsize for x in e.outvars)
        for p in e.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
                    total += _bytes_passed(getattr(sub, "jaxpr", sub), n)
    return total


@pytest.mark.parametrize("zigzag", [False, True])
def test_the_ring_passes_each_slice_only_where_it_is_needed(zigzag):
    """Over C devices a key / value slice must visit the C - 1 others, so the forward pass makes C - 1 exchanges
    of K and V (not C: the last slice held goes nowhere); the backward pass C - 1 of K and V and C of their
    gradients, which end on the slice's own device."""
    from jax.sharding import PartitionSpec as P
    from gptjax.model.ring import ring_attention

    C, per, H = 4, 16, 8
    q, k, v = qkv(1, 2, 2, C * per, C * per, H)
    mesh = jax.make_mesh((C,), ("context",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:C])
    layout = ContextLayout(("context",), C, "zigzag" if zigzag else "ring")
    ring = jax.shard_map(lambda q, k, v: ring_attention(q, k, v, MaskSpec(window=C * per, context=layout),
                                                        KernelOptions(block_q=8, block_k=8)),
                         mesh=mesh, in_specs=(P(None, None, None, "context"),) + (P(None, None, "context"),) * 2,
                         out_specs=P(None, None, None, "context"))
    kv = 2 * k.size // C * 4  # one device's K and V slices, float32
    forward = _bytes_passed(jax.make_jaxpr(ring)(q, k, v).jaxpr)
    step = _bytes_passed(jax.make_jaxpr(jax.grad(lambda *a: ring(*a).sum(), argnums=(0, 1, 2)))(q, k, v).jaxpr)
    assert forward == (C - 1) * kv
    assert step - forward == (C - 1) * kv + C * kv


def test_the_zigzag_layout_balances_the_rings_work():
    """Contiguous slices: at step s the first s devices idle (their queries precede the slice they hold) while
    the rest do a full slice pair, so each step lasts a full pair. Zig-zag: every device does the same work at
    every step, the same total, and the pass's critical path (the busiest device per step) is ~(C + 1) / 2C of
    the contiguous one. Counted by the kernel's own tile bounds."""
    from gptjax.model.ring import tiles_per_step

    for C in (4, 8):
        flat = tiles_per_step(ContextLayout(("context",), C, "ring"), 4096, 128)
        zz = tiles_per_step(ContextLayout(("context",), C, "zigzag"), 4096, 128)
        assert flat.sum() == zz.sum()
        assert (zz.max(axis=1) == zz.min(axis=1)).all() and not (flat.max(axis=1) == flat.min(axis=1)).all()
        assert flat.max(axis=1).sum() / zz.max(axis=1).sum() > 1.7


@pytest.mark.parametrize("K, G, window, seg", [(4, 1, 40, False), (1, 4, 40, True), (2, 3, 9, True)])
def test_blockwise_lanes_match_dense(K, G, window, seg):
    """Lanes split the kv heads when they divide (else the query groups, whose dK / dV add up)."""
    q, k, v = qkv(2, K, G, 40, 40, 8)
    ids = segments(2, 40, 2) if seg else None
    (o1, g1), (o2, g2) = both(q, k, v, window, MaskSpec(0, ids, ids), 16, 16, lanes=2)
    np.testing.assert_allclose(o1, o2, atol=ATOL, rtol=0)
    for a, b, what in zip(g1, g2, "qkv"):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0, err_msg=f"d{what}")


def test_blockwise_with_an_offset_matches_dense():
    """Queries after a cache prefix (slots 24..39 of 48: the rest of the keys are in the future)."""
    q, k, v = qkv(2, 2, 2, 16, 48, 8)
    (o1, g1), (o2, g2) = both(q, k, v, 48, MaskSpec(24), 8, 16)
    np.testing.assert_allclose(o1, o2, atol=ATOL, rtol=0)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(g1[1])[:, :, 40:], 0)  # future keys get no gradient


def test_blockwise_bf16_is_close_to_fp32():
    q, k, v = qkv(1, 2, 2, 96, 96, 16)
    mask = MaskSpec(window=96)
    ref = flash.blockwise_attention(q, k, v, mask, KernelOptions(block_q=32, block_k=32))
    low = flash.blockwise_attention(q, k, v, mask, KernelOptions(dtype=jnp.bfloat16, block_q=32, block_k=32))
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), ref, atol=3e-2, rtol=0)


@pytest.mark.parametrize("bq, bk, window, offset, nq, nk", [
    (16, 16, 64, 0, 4, 4), (16, 32, 9, 0, 5, 3), (32, 16, 17, 0, 3, 6), (8, 16, 48, 24, 2, 3), (64, 50, 4, 0, 2, 2)])
def test_tiles_visited_are_exactly_those_with_a_visible_pair(bq, bk, window, offset, nq, nk):
    """The loop bounds skip every tile above the diagonal or outside the band, and no tile with a visible pair."""
    t = flash.TileBounds(bq, bk, nq, nk, window, offset, False)
    allowed = np.asarray(causal_mask(nq * bq, nk * bk, window, offset))
    needed = {(i, j) for i in range(nq) for j in range(nk) if allowed[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].any()}
    by_rows = {(i, j) for i in range(nq) for j in range(*map(int, t.k_range(i)))}
    by_cols = {(i, j) for j in range(nk) for i in range(*map(int, t.q_range(j)))}
    assert by_rows == needed and by_cols == needed
    # and the tiles run without the mask are exactly those whose every pair is visible
    full = {(i, j) for i in range(nq) for j in range(nk) if allowed[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].all()}
    runs = lambda r: {(idx, bool(m)) for lo, hi, m in r for idx in range(int(lo), int(hi))}
    assert {(i, j) for i in range(nq) for j, m in runs(t.k_runs(i)) if not m} == full
    assert {(i, j) for j in range(nk) for i, m in runs(t.q_runs(j)) if not m} == full
    assert {(i, j) for i in range(nq) for j, _ in runs(t.k_runs(i))} == needed


def test_banded_work_is_linear_in_length():
    """A banded layer visits O(L) tiles, a causal one O(L^2)."""
    def visited(L, window):
        n = L // 16
        t = flash.TileBounds(16, 16, n, n, window, 0, False)
        return sum(int(t.k_range(i)[1] - t.k_range(i)[0]) for i in range(n))
    assert visited(1024, 32) <= 2 * visited(512, 32) + 3  # 3 tiles per query block
    assert visited(1024, 1024) >= 3.9 * visited(512, 512)


@pytest.mark.parametrize("window", [256, 64])
def test_cudnn_call_layout_and_band_match_dense(window):
    """The cuDNN path's call (layout, GQA grouping, band) run through XLA's implementation on CPU."""
    q, k, v = qkv(2, 2, 3, 256, 256, 8)
    out = cudnn_attention(q, k, v, MaskSpec(window=window), KernelOptions(portable=True))
    np.testing.assert_allclose(out, dense_attention(q, k, v, MaskSpec(window=window), KernelOptions()), atol=ATOL,
                               rtol=0)


@pytest.mark.parametrize("window, seg", [(256, False), (64, True)])
def test_splash_kernel_in_interpret_mode_matches_dense(window, seg):
    """JAX's TPU splash kernel, run by the Pallas interpreter: the mask, segment ids and GQA plumbing."""
    q, k, v = qkv(1, 2, 2, 256, 256, 16)
    ids = segments(1, 256, 2) if seg else None
    mask = MaskSpec(0, ids, ids, window=window)
    f = lambda q, k, v: splash_attention(q, k, v, mask, KernelOptions(block_q=128, block_k=128, portable=True))
    g = lambda q, k, v: dense_attention(q, k, v, mask, KernelOptions())
    np.testing.assert_allclose(f(q, k, v), g(q, k, v), atol=ATOL, rtol=0)
    loss = lambda fn: lambda q: jnp.sum(fn(q, k, v) ** 2)
    np.testing.assert_allclose(jax.grad(loss(f))(q), jax.grad(loss(g))(q), atol=1e-4, rtol=0)


@pytest.mark.parametrize("length", [1, 7, 40, 255, 256, 512, 513, 700, 768, 1024, 1500, 2048, 8192, 8200])
def test_balanced_tiles_are_equal_at_least_two_and_never_wider_than_the_block(length):
    block = balanced_block(length, 512)
    n = -(-length // block)
    assert block % 8 == 0 and block <= 512
    assert n >= min(2, -(-length // 8))  # two tiles unless the length fits one 8-row tile
    assert n == max(2, -(-length // 512)) or block == 8  # no more tiles than the configured block needs
    assert n * block - length < 8 * n  # padding: under one 8-row group per tile (no nearly empty tile)


def test_kernel_choice():
    assert choose_kernel("auto", "cpu", DENSE_MAX_LEN_CPU, True, False) == "dense"
    assert choose_kernel("auto", "cpu", DENSE_MAX_LEN_CPU + 1, True, False) == "blockwise"
    assert choose_kernel("auto", "gpu", 128, True, False) == "cudnn"
    assert choose_kernel("auto", "gpu", 128, True, False, dtype="bfloat16") == "cudnn"
    assert choose_kernel("auto", "gpu", 128, True, False, dtype=jnp.float32) == "blockwise"  # cuDNN: no fp32 kernel
    assert choose_kernel("auto", "gpu", 4096, True, True) == "blockwise"  # cuDNN here takes no segment mask
    assert choose_kernel("auto", "tpu", 4096, True, True) == "splash"
    assert choose_kernel("splash", "tpu", 4096, False, False) == "blockwise"  # a cache offset / context slice
    assert choose_kernel("dense", "gpu", 65536, True, False) == "dense"  # an explicit choice is kept
    with pytest.raises(ConfigError, match="attention_impl='flash' is not valid"):
        ModelConfig(attention_impl="flash")


@pytest.mark.parametrize("cfg_kw", [
    dict(attention="alternating", window=8, scan_layers=True),  # traced per-layer window
    dict(attention="alternating", window=8, scan_layers=False, n_kv_heads=1),
])
def test_model_with_blockwise_attention_matches_dense(cfg_kw):
    """Logits and parameter gradients of whole models, packed segments included."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 40)), jnp.int32)
    seg = segments(2, 40, 3)
    results = []
    for impl in ("blockwise", "dense"):
        model = Decoder(nano_model(attention_impl=impl, attention_block=16, **cfg_kw), nnx.Rngs(0))
        graphdef, params = nnx.split(model)

        def loss(params):
            logits = nnx.merge(graphdef, params)(tokens, segment_ids_BxL=seg)
            return jnp.mean(logits ** 2), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        results.append((logits, grads))
    (l1, g1), (l2, g2) = results
    np.testing.assert_allclose(l1, l2, atol=ATOL, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g1, g2)


def test_compiled_memory_grows_linearly_with_blockwise_and_quadratically_with_dense():
    """XLA's own per-device figure for one layer's forward + backward at 1k and 4k tokens."""
    from gptjax.planning.memory import memory_of

    def temp_bytes(impl, L):
        cfg = nano_model(n_layers=1, max_seq_len=L, attention_impl=impl, attention_block=256)
        graphdef, params = nnx.split(Decoder(cfg, nnx.Rngs(0)))
        f = jax.jit(jax.grad(lambda p, t: jnp.mean(nnx.merge(graphdef, p)(t))))
        return memory_of(f.lower(params, jax.ShapeDtypeStruct((1, L), jnp.int32)).compile())["temp"]

    blockwise = temp_bytes("blockwise", 4096) / temp_bytes("blockwise", 1024)
    dense = temp_bytes("dense", 4096) / temp_bytes("dense", 1024)
    assert blockwise < 4.5 and dense > 10, (blockwise, dense)


def test_on_a_mesh_without_context_split_the_chosen_kernel_is_kept(monkeypatch):
    """Under shard_map (data parallel over 8 devices) a self-attention call keeps a static zero offset, so a
    kernel that needs self-attention (here the cuDNN call, run through XLA on CPU) is still the one used."""
    import dataclasses

    from gptjax.model import kernels
    from gptjax.sharding import make_mesh, make_rules
    from gptjax.config import MeshConfig
    from gptjax.sharding.rules import activation_sharding

    calls = []
    real = KERNELS["cudnn"]
    monkeypatch.setitem(KERNELS, "cudnn", dataclasses.replace(real, run=lambda *a: calls.append(1) or real.run(*a)))
    q, k, v = qkv(8, 2, 2, 32, 32, 8)
    mesh = make_mesh(MeshConfig(data=8))
    with activation_sharding(mesh, make_rules()):
        out = jax.jit(lambda q, k, v: kernels.attend(q, k, v, MaskSpec(window=32, windows=(32,)), impl="cudnn",
                                                     block=16, dtype=jnp.bfloat16))(q, k, v)
    assert calls, "fell back to another kernel"
    np.testing.assert_allclose(out.astype(jnp.float32), dense_attention(q, k, v, MaskSpec(window=32), KernelOptions()),
                               atol=3e-2, rtol=0)
