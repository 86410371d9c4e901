import json
import jax
import pytest

from helpers import assert_trees_equal, batch_for, tiny_program
from gptjax.checkpoint import Checkpointer, CheckpointNotFound, init_params_from, load_run
from gptjax.config import ConfigError, MeshConfig
from gptjax.model import stack_layers, unstack_layers
from gptjax.sharding.mesh import make_mesh


def test_checkpoint_round_trip_gives_identical_params_and_next_loss(tmp_path):
    prog = tiny_program()
    state = prog.init(jax.random.key(0))
    for s in range(3):
        state, _ = prog.train_step(state, batch_for(prog, s))
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(3, state)
    restored = ckpt.restore(prog.abstract_state)
    assert_trees_equal(restored, state)
    _, m1 = prog.train_step(state, batch_for(prog, 9))
    _, m2 = prog.train_step(restored, batch_for(prog, 9))
    assert float(m1["loss"]) == float(m2["loss"])
    with pytest.raises(CheckpointNotFound, match="no checkpoint for step 7"):
        ckpt.restore(prog.abstract_state, step=7)
    with pytest.raises(CheckpointNotFound, match="no checkpoint in"):
        Checkpointer(tmp_path / "empty").restore(prog.abstract_state)


def test_asynchronous_saves_record_their_checksums_off_the_step_loop(tmp_path):
    """The checksums of a finished asynchronous save are recorded by a thread that the next save starts (they
    read every file back: on a bucket most of a save's time), the save after joins it, and close records the last:
    every step ends with its record, and a record that fails surfaces as the next save's error."""
    from gptjax.checkpoint.manager import CHECKSUMS, CheckpointWriteError, checksum_problem

    prog = tiny_program()
    state = prog.init(jax.random.key(0))
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=True)
    ckpt.save(1, state)
    ckpt.save(2, state)  # finishes step 1's save, starts recording its checksums in the background
    assert ckpt._recording is not None and ckpt._recording.name == "gptjax-checksums-1"
    ckpt.save(3, state)
    assert (tmp_path / "ckpt" / "1" / CHECKSUMS).is_file() and checksum_problem(tmp_path / "ckpt" / "1") is None
    ckpt.close()
    for step in (1, 2, 3):
        assert json.loads((tmp_path / "ckpt" / str(step) / CHECKSUMS).read_text())["files"]

    again = Checkpointer(tmp_path / "again", async_save=True)
    again.save(1, state)
    again.save(2, state)
    again._record_error = OSError("No space left on device")  # as the recording thread stores its failure
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        again.save(3, state)


def saved_run(run_dir, steps=3, **model_kw):
    """A run directory as training leaves it: config.json and a checkpoint of the train state at ``steps``."""
    prog = tiny_program(**model_kw)
    state = prog.init(jax.random.key(0))
    for s in range(steps):
        state, _ = prog.train_step(state, batch_for(prog, s))
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(prog.cfg.to_json())
    ckpt = Checkpointer(run_dir / "checkpoints")
    ckpt.save(steps, state)
    ckpt.close()
    return prog, jax.device_get(state)


def test_load_run_reads_only_the_parameters(tmp_path):
    prog, state = saved_run(tmp_path / "run")
    loaded = load_run(tmp_path / "run", tokenizer=False)
    cfg, params = loaded.config, loaded.params
    assert cfg == prog.cfg and loaded.step == 3 and loaded.tokenizer is None and loaded.model.cfg == cfg.model
    assert set(params) == set(state["params"])  # parameters only: no step, no Adam moments
    assert_trees_equal(params, state["params"])
    # onto another mesh: FSDP over 4 devices, sharded by the run's rules
    mesh = make_mesh(MeshConfig(data=1, fsdp=4), jax.devices()[:4])
    sharded = load_run(tmp_path / "run", step=3, mesh=mesh, tokenizer=False).params
    assert sharded["blocks"][0]["mlp"]["w_up"].sharding.spec[0] == "fsdp"
    assert_trees_equal(sharded, state["params"])
    with pytest.raises(CheckpointNotFound, match="no checkpoint for step 5"):
        load_run(tmp_path / "run", step=5, tokenizer=False)
    with pytest.raises(CheckpointNotFound, match="is .* a gptjax run directory"):
        load_run(tmp_path / "nothing")


@pytest.mark.parametrize("src_scan, dst_scan", [(False, True), (True, False), (False, False)])
def test_init_from_starts_a_new_run_from_another_runs_params(tmp_path, src_scan, dst_scan):
    _, src_state = saved_run(tmp_path / "src", scan_layers=src_scan)
    dst = tiny_program(scan_layers=dst_scan)
    params = init_params_from(tmp_path / "src", dst.model)
    expected = src_state["params"]
    if src_scan != dst_scan:
        expected = stack_layers(expected) if dst_scan else unstack_layers(expected, 2)
    assert_trees_equal(params, expected)
    state = dst.init_from_params(params)
    assert int(state["step"]) == 0
    adam = state["opt_state"][1][0]
    assert all(float(abs(x).max()) == 0.0 for x in jax.tree.leaves(adam.mu))  # a fresh optimizer
    _, m = dst.train_step(state, batch_for(dst, 0))
    assert float(m["loss"]) < 6.0  # starts from the trained params, not from scratch (~log 512 = 6.24)


def test_init_from_a_different_architecture_is_a_clear_error(tmp_path):
    saved_run(tmp_path / "src")
    other = tiny_program(d_ff=96, use_bias=True)
    with pytest.raises(ConfigError, match=r"model.d_ff: 128 there, 96 here.*model.use_bias: False there, True here"):
        init_params_from(tmp_path / "src", other.model)


def test_iterator_states_of_another_process_count_are_shared_or_refused(tmp_path):
    """A step written by N processes resumes on any count when they all saved one data position; differing
    positions are refused by name, and an empty data item is damage."""
    from gptjax.checkpoint.manager import CheckpointMismatch, data_files, shared_iterator_state, step_problem

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        (data / f"process_{i}-of-2.json").write_text(json.dumps({"next_index": 7}))
    assert shared_iterator_state(data) == (2, {"next_index": 7})
    (data / "process_1-of-2.json").write_text(json.dumps({"next_index": 6}))
    with pytest.raises(CheckpointMismatch, match="different data positions"):
        shared_iterator_state(data)
    (data / "process_1-of-2.json").unlink()
    with pytest.raises(CheckpointMismatch, match="lacks iterator states"):
        shared_iterator_state(data)
    (data / "process_0-of-2.json").unlink()
    assert data_files(data) == {}
    assert "no iterator state" in (step_problem_with_data(tmp_path, step_problem) or "")


def step_problem_with_data(tmp_path, step_problem):
    """step_problem of a step directory whose files are all there but the data item's iterator states."""
    step = tmp_path / "step"
    for item in ("", "state", "data"):
        (step / item).mkdir(parents=True, exist_ok=True)
        (step / item / "commit_success.txt").write_text("ok")
    (step / "_CHECKPOINT_METADATA").write_text("{}")
    (step / "state" / "_METADATA").write_text("{}")
    return step_problem(step)
