"""Sharded training on 8 simulated CPU devices (the session's XLA_FLAGS; see conftest.py)."""

import re

import jax
import numpy as np
import pytest

from helpers import nano_model, random_batch
from gptjax.checkpoint.manager import Checkpointer
from gptjax.model.decoder import unstack_layers
from gptjax.config import ConfigError, MeshConfig, OptimConfig, RunConfig, TrainConfig
from gptjax.sharding import logical_to_pspec, make_mesh, make_rules
from gptjax.training.program import Program

MESHES = {"ddp 8x1x1": dict(data=8, fsdp=1, tensor=1), "fsdp 1x8x1": dict(data=1, fsdp=8, tensor=1),
          "hybrid 2x2x2": dict(data=2, fsdp=2, tensor=2), "fsdp+tp 1x4x2": dict(data=1, fsdp=4, tensor=2),
          # two slices of 4 (DCN between them): data over DCN (the default), and fsdp over DCN
          "2 slices, data over dcn 2x4x1": dict(data=2, fsdp=4, tensor=1, slices=2),
          "2 slices, fsdp over dcn 2x4x1": dict(data=2, fsdp=4, tensor=1, slices=2, dcn={"fsdp": 2})}
# Equivalence tolerance: sharded reductions sum in a different order; Adam normalises the update, so a
# parameter whose gradient is tiny can move by a few 1e-6 differently. Loss: 1e-6 relative; params: 2e-5 abs.
PARAM_ATOL = 2e-5


def program(mesh_kw, devices=None, context_strategy="gather", optimizer="adamw", **model_kw):
    model_kw.setdefault("scan_layers", True)  # the stacked layout of large runs; unrolled is tested below
    cfg = RunConfig(model=nano_model(**model_kw), optim=OptimConfig(name=optimizer, lr=3e-3, warmup_steps=0),
                    mesh=MeshConfig(**mesh_kw, context_strategy=context_strategy),
                    train=TrainConfig(batch_size=8, seq_len=32, steps=10))
    return Program(cfg, make_mesh(cfg.mesh, devices))


@pytest.fixture(scope="module")
def batch():
    return random_batch(batch=8, seq=32)


@pytest.fixture(scope="module")
def reference(batch):
    assert jax.device_count() == 8
    prog = program(dict(data=1), jax.devices()[:1])
    state = prog.init(jax.random.key(0))
    init = jax.device_get(state)  # before the step donates the state's buffers
    new_state, metrics = prog.train_step(state, prog.global_batch(batch))
    return init, jax.device_get(new_state), float(metrics["loss"])


def shard_bytes(tree) -> int:
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_step_equals_single_device_step(name, batch, reference):
    init_ref, after_ref, loss_ref = reference
    prog = program(MESHES[name])
    state = prog.init(jax.random.key(0))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state["params"], init_ref["params"])
    new_state, metrics = prog.train_step(state, prog.global_batch(batch))
    assert float(metrics["loss"]) == pytest.approx(loss_ref, rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=PARAM_ATOL, rtol=0),
                 new_state["params"], after_ref["params"])
    moved = max(float(np.max(np.abs(a - b))) for a, b in
                zip(jax.tree.leaves(after_ref["params"]), jax.tree.leaves(init_ref["params"])))
    assert moved > 100 * PARAM_ATOL  # the step really changed the params


@pytest.mark.parametrize("name, w_up_spec, w_up_shard, emb_spec, emb_shard", [
    ("ddp 8x1x1", (), (2, 64, 128), (), (512, 64)),
    ("fsdp 1x8x1", (None, "fsdp"), (2, 8, 128), (None, "fsdp"), (512, 8)),
    ("hybrid 2x2x2", (None, "fsdp", "tensor"), (2, 32, 64), ("tensor", "fsdp"), (256, 32)),
    ("fsdp+tp 1x4x2", (None, "fsdp", "tensor"), (2, 16, 64), ("tensor", "fsdp"), (256, 16)),
])
def test_params_and_optimizer_state_are_sharded_by_the_rules(name, w_up_spec, w_up_shard, emb_spec, emb_shard):
    prog = program(MESHES[name])
    state = prog.init(jax.random.key(0))
    w_up = state["params"]["blocks"]["mlp"]["w_up"]
    assert tuple(w_up.sharding.spec) == w_up_spec
    assert {s.data.shape for s in w_up.addressable_shards} == {w_up_shard}
    emb = state["params"]["embedding"]
    assert tuple(emb.sharding.spec) == emb_spec and emb.addressable_shards[0].data.shape == emb_shard
    # the rules table is the single source: the spec is what logical_to_pspec says for the logical names
    assert w_up.sharding.spec == logical_to_pspec(("layers", "embed", "mlp"), make_rules(), prog.mesh, w_up.shape)
    norm = state["params"]["blocks"]["attn_norm"]["scale"]
    assert tuple(norm.sharding.spec) == ()  # norms are replicated
    # Adam moments are sharded exactly like their parameters
    adam = state["opt_state"][1][0]
    assert adam.mu["blocks"]["mlp"]["w_up"].sharding == w_up.sharding
    assert adam.nu["embedding"].sharding == emb.sharding


def collectives(prog, batch) -> dict[str, int]:
    state = prog.abstract_state
    hlo = prog.train_step.lower(state, prog.global_batch(batch)).compile().as_text()
    names = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
    return {c: len(re.findall(rf"\b{c}(?:-start)?\(", hlo)) for c in names}


def test_compiled_collectives_match_the_strategy(batch):
    ddp = collectives(program(MESHES["ddp 8x1x1"]), batch)
    assert ddp["all-reduce"] >= 1  # the gradient all-reduce (XLA combines them)
    assert ddp["all-gather"] == ddp["reduce-scatter"] == ddp["all-to-all"] == ddp["collective-permute"] == 0
    fsdp = collectives(program(MESHES["fsdp 1x8x1"]), batch)
    assert fsdp["all-gather"] >= 2 * 2  # each layer's weights are gathered for use (forward and backward)
    # gradients are reduced and left sharded: XLA:CPU emits this as all-reduce + slice, other backends as
    # reduce-scatter
    assert fsdp["reduce-scatter"] + fsdp["all-reduce"] >= 1


def test_fsdp_state_bytes_per_device_are_an_eighth():
    single = program(dict(data=1), jax.devices()[:1]).init(jax.random.key(0))
    fsdp = program(MESHES["fsdp 1x8x1"]).init(jax.random.key(0))
    ddp = program(MESHES["ddp 8x1x1"]).init(jax.random.key(0))
    full = shard_bytes({"p": single["params"], "o": single["opt_state"]})
    per_dev = shard_bytes({"p": fsdp["params"], "o": fsdp["opt_state"]})
    assert shard_bytes({"p": ddp["params"], "o": ddp["opt_state"]}) == full
    # only the norm scales (and the step counters) stay replicated
    assert full / 8 <= per_dev < full / 8 * 1.05


def test_checkpoint_restores_onto_a_different_mesh(tmp_path, batch):
    src = program(MESHES["fsdp 1x8x1"])
    state, _ = src.train_step(src.init(jax.random.key(0)), src.global_batch(batch))
    Checkpointer(tmp_path).save(1, state)
    host = jax.device_get(state)
    _, m0 = src.train_step(state, src.global_batch(batch))
    for target in (program(MESHES["hybrid 2x2x2"]), program(dict(data=1), jax.devices()[:1]),
                   program(MESHES["2 slices, fsdp over dcn 2x4x1"])):  # a checkpoint moves onto two slices
        restored = Checkpointer(tmp_path).restore(target.abstract_state)
        w = restored["params"]["blocks"]["mlp"]["w_up"]
        assert w.sharding == target.model.param_shardings["blocks"]["mlp"]["w_up"]
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), restored, host)
        _, m1 = target.train_step(restored, target.global_batch(batch))
        assert float(m1["loss"]) == pytest.approx(float(m0["loss"]), rel=1e-6)


def test_scan_and_remat_under_fsdp(batch, reference):
    _, _, loss_ref = reference
    # one policy under the mesh (every policy is checked against no remat on one device in test_model.py)
    for kw in (dict(scan_layers=True, remat="save_dots"),):
        prog = program(MESHES["fsdp+tp 1x4x2"], **kw)
        _, m = prog.train_step(prog.init(jax.random.key(0)), prog.global_batch(batch))
        assert float(m["loss"]) == pytest.approx(loss_ref, rel=1e-6)


def test_unrolled_layout_is_sharded_and_equivalent(batch, reference):
    init_ref, after_ref, loss_ref = reference
    prog = program(MESHES["fsdp+tp 1x4x2"], scan_layers=False)
    w_up = prog.init(jax.random.key(0))["params"]["blocks"][1]["mlp"]["w_up"]
    assert tuple(w_up.sharding.spec) == ("fsdp", "tensor") and w_up.addressable_shards[0].data.shape == (16, 64)
    # the same math as the stacked layout, from the same (converted) initial parameters
    params = unstack_layers(init_ref["params"], 2)
    state = prog.init_from_params(jax.device_put(params, prog.model.param_shardings))
    new_state, metrics = prog.train_step(state, prog.global_batch(batch))
    assert float(metrics["loss"]) == pytest.approx(loss_ref, rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=PARAM_ATOL, rtol=0),
                 new_state["params"], unstack_layers(after_ref["params"], 2))


def test_slices_are_placed_along_the_axes_that_span_them():
    """Over 2 simulated slices of 4 devices (0-3, 4-7), fsdp over DCN: each slice fills one half of the fsdp axis
    for every data index, so only fsdp's collectives cross slices; data over DCN: one slice per data index."""
    from gptjax.sharding.mesh import describe

    cfg = MeshConfig(data=2, fsdp=4, slices=2, dcn={"fsdp": 2})
    mesh = make_mesh(cfg)
    ids = np.vectorize(lambda d: d.id)(mesh.devices)[:, :, 0, 0]
    assert ids.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert describe(mesh, cfg) == ("data=2 x fsdp=4 x context=1 x tensor=1 (8 devices, 2 slices: fsdp 2-way over "
                                   "DCN)")
    by_data = np.vectorize(lambda d: d.id)(make_mesh(MeshConfig(data=2, fsdp=4, slices=2)).devices)[:, :, 0, 0]
    assert [{i // 4 for i in row} for row in by_data.tolist()] == [{0}, {1}]
    with pytest.raises(ConfigError, match=r"mesh.dcn\['tensor'\]: only data and fsdp may span slices"):
        MeshConfig(tensor=2, slices=2, dcn={"tensor": 2})
    with pytest.raises(ConfigError, match="splits the axes 2 ways across slices, but mesh.slices=4"):
        MeshConfig(slices=4, dcn={"data": 2})
    with pytest.raises(ConfigError, match="mesh.data=1 does not split over the 2 slices"):
        make_mesh(MeshConfig(data=1, fsdp=8, slices=2))


def test_bad_mesh_and_rules_are_clear_errors():
    with pytest.raises(ConfigError, match="has 6 devices but 8 are available"):
        make_mesh(MeshConfig(data=3, fsdp=2))
    with pytest.raises(ValueError, match="unknown logical axis 'embedding'"):
        make_rules({"embedding": "fsdp"})


def test_rules_override_turns_fsdp_axis_into_data_parallel():
    cfg = RunConfig(model=nano_model(), mesh=MeshConfig(data=1, fsdp=8, rules={"embed": None}),
                    train=TrainConfig(batch_size=8, seq_len=32))
    prog = Program(cfg, make_mesh(cfg.mesh))
    assert tuple(prog.model.param_shardings["blocks"][0]["mlp"]["w_up"].spec) == ()
    assert tuple(prog.model.batch_sharding.spec) == ("fsdp",)


@pytest.mark.parametrize("mesh, strategy, remat", [
    (dict(data=1, fsdp=2, context=4), "gather", "none"),
    (dict(data=1, fsdp=2, context=2, tensor=2), "gather", "none"),
    (dict(data=1, context=8), "zigzag", "full"),
])
def test_context_parallel_step_equals_single_device_step(mesh, strategy, remat, batch, reference):
    """The sequence split over ``context`` devices (keys / values all-gathered in attention, or passed around the
    ring in the zig-zag layout, also recomputed under remat): the same step, and the same logits."""
    init_ref, after_ref, loss_ref = reference
    prog = program(mesh, attention_impl="blockwise", attention_block=4, context_strategy=strategy, remat=remat)
    state = prog.init(jax.random.key(0))
    x = prog.global_batch(batch)["inputs"]
    assert x.sharding.spec[1] == "context"  # the batch itself arrives split along the sequence
    if strategy == "zigzag":  # logits come back in the sequence's own order
        one = program(dict(data=1), jax.devices()[:1])
        np.testing.assert_allclose(np.asarray(prog.model.forward(state["params"], x)),
                                   np.asarray(one.model.forward(one.model.put_params(init_ref["params"]),
                                                                batch["inputs"])), atol=1e-4, rtol=0)
    new_state, metrics = prog.train_step(state, prog.global_batch(batch))
    assert float(metrics["loss"]) == pytest.approx(loss_ref, rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=PARAM_ATOL, rtol=0),
                 new_state["params"], after_ref["params"])
    hlo = prog.train_step.lower(state, prog.global_batch(batch)).compile().as_text()
    gathered = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", hlo)
    if strategy == "gather":
        assert gathered  # keys / values gathered over the context axis
    else:
        assert re.search(r"\bcollective-permute(?:-start)?\(", hlo)  # slices passed to the next device
        # no device ever holds the whole sequence's keys (and no other axis gathers); the zig-zag layout reorders
        # the [B, L] token ids, targets and loss mask, which gathers those
        assert set(gathered) == {"8,32"}, gathered


def test_context_parallel_packed_segments_and_banded_layers(batch):
    """Segment ids and GPT-3 banded layers under a context split (dense kernel per gathered slice, and the ring
    in the zig-zag layout, which reorders the segment ids too) give the loss and gradients of one device running
    the blockwise kernel."""
    seg = np.repeat(np.arange(4), 8)[None].repeat(8, 0).astype(np.int32)
    seg[:, 13:] += 1  # a document boundary inside a slice, not only on the slices' edges
    results = []
    for mesh, devices, impl, strategy in ((dict(data=1), jax.devices()[:1], "blockwise", "gather"),
                                          (dict(data=2, context=4), None, "dense", "gather"),
                                          (dict(data=2, context=4), None, "blockwise", "zigzag")):
        prog = program(mesh, devices, attention="alternating", window=5, attention_impl=impl, attention_block=3,
                       context_strategy=strategy)
        state = prog.init(jax.random.key(0))
        new_state, m = prog.train_step(state, prog.global_batch({**batch, "segment_ids": seg}))
        results.append((float(m["loss"]), jax.device_get(new_state["params"])))
    for loss, params in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=PARAM_ATOL, rtol=0), params, results[0][1])


@pytest.mark.parametrize("name", ["hybrid 2x2x2", "fsdp+tp 1x4x2"])
def test_fused_loss_step_equals_the_plain_step_on_a_mesh(name, batch, reference):
    """``model.loss_chunk``: the unembedding + cross-entropy 12 positions at a time (32 is not a multiple: the
    last chunk is padded), the vocabulary sharded over tensor, the gradient formed in the forward pass."""
    init_ref, after_ref, loss_ref = reference
    prog = program(MESHES[name], loss_chunk=12)
    new_state, metrics = prog.train_step(prog.init(jax.random.key(0)), prog.global_batch(batch))
    assert float(metrics["loss"]) == pytest.approx(loss_ref, rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=PARAM_ATOL, rtol=0),
                 new_state["params"], after_ref["params"])


@pytest.mark.parametrize("name", ["hybrid 2x2x2", "fsdp+tp 1x4x2"])
def test_muon_sharded_steps_equal_one_device_steps(name, batch):
    """optim.name=muon: Newton-Schulz on each hidden matrix's momentum (FSDP- and tensor-sharded here) gives the
    one-device update; two steps, so the momentum and the orthogonalised update both count. Its momentum is sharded
    like its matrix."""
    def two_steps(prog):
        state = prog.init(jax.random.key(0))
        losses = []
        for _ in range(2):
            state, metrics = prog.train_step(state, prog.global_batch(batch))
            losses.append(float(metrics["loss"]))
        return state, losses

    ref, ref_losses = two_steps(program(dict(data=1), jax.devices()[:1], optimizer="muon"))
    prog = program(MESHES[name], optimizer="muon")
    state, losses = two_steps(prog)
    assert losses == pytest.approx(ref_losses, rel=1e-6) and losses[1] < losses[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=PARAM_ATOL, rtol=0),
                 state["params"], jax.device_get(ref["params"]))
    w_up = prog.model.param_shardings["blocks"]["mlp"]["w_up"]
    mus = [x for x in jax.tree.leaves(state["opt_state"]) if getattr(x, "shape", None) == w_up.shard_shape(
        state["params"]["blocks"]["mlp"]["w_up"].shape) or (hasattr(x, "sharding") and x.shape ==
        state["params"]["blocks"]["mlp"]["w_up"].shape)]
    assert any(m.sharding.is_equivalent_to(w_up, m.ndim) for m in mus)
