import dataclasses
import json

import pytest

from gptjax.config import (MODEL_PRESETS, AttentionImpl, ConfigError, ContextStrategy, DataConfig, MeshConfig,
                           ModelConfig, OptimConfig, Remat, Role, RunConfig, TrainConfig, apply_overrides,
                           build_run_config, choices, model_preset, role_of, run_preset)


@pytest.mark.parametrize("kw, words", [
    (dict(n_heads=8, n_kv_heads=3), "must divide n_heads"),
    (dict(n_heads=8, n_kv_heads=0), "must divide n_heads"),
    (dict(d_model=100, n_heads=8), "head_dim"),
    (dict(positions="alibi"), "positions='alibi' is not valid"),
    (dict(norm="batchnorm"), "norm="),
    (dict(mlp="relu"), "mlp="),
    (dict(attention="alternating", window=0), "window"),
    (dict(dtype="float16"), "dtype="),
    (dict(d_ff=0), "d_ff must be a positive integer"),
    (dict(remat="sometimes"), "remat="),
    (dict(head_dim=15, positions="rope"), "even head_dim"),
])
def test_bad_model_configs_name_the_problem(kw, words):
    with pytest.raises(ConfigError, match=words):
        ModelConfig(**kw)


def test_attention_kind_from_kv_heads():
    assert ModelConfig(n_heads=8).attention_kind == "MHA"
    assert ModelConfig(n_heads=8, n_kv_heads=8).attention_kind == "MHA"
    assert ModelConfig(n_heads=8, n_kv_heads=2).attention_kind == "GQA"
    assert ModelConfig(n_heads=8, n_kv_heads=1).attention_kind == "MQA"


def test_alternating_windows():
    cfg = ModelConfig(n_layers=4, attention="alternating", window=16, max_seq_len=64)
    assert cfg.layer_windows() == (64, 16, 64, 16)
    assert ModelConfig(n_layers=3, max_seq_len=64).layer_windows() == (64, 64, 64)


def test_from_dict_rejects_unknown_fields_and_round_trips():
    with pytest.raises(ConfigError, match="unknown field.*d_modle"):
        RunConfig.from_dict({"model": {"d_modle": 3}})
    with pytest.raises(ConfigError, match="unknown field.*trian"):
        RunConfig.from_dict({"trian": {}})
    cfg = RunConfig.from_dict(run_preset("austen"))
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_seq_len_cannot_exceed_context():
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len"):
        RunConfig.from_dict({"model": {"max_seq_len": 64}, "train": {"seq_len": 128}})
    zigzag = {"model": {"max_seq_len": 128, "context_strategy": "zigzag"}, "mesh": {"context": 4},
              "train": {"seq_len": 100}}
    with pytest.raises(ConfigError, match=r"2 x mesh.context = 8 equal chunks; train.seq_len=100 does not"):
        RunConfig.from_dict(zigzag)
    RunConfig.from_dict({**zigzag, "train": {"seq_len": 96}})


def test_overrides_parse_json_values():
    d = apply_overrides(RunConfig().to_dict(), ["model.d_model=128", "model.dtype=bfloat16", "mesh.rules={}"])
    cfg = RunConfig.from_dict(d)
    assert cfg.model.d_model == 128 and cfg.model.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="section.field=value"):
        apply_overrides({}, ["nonsense"])


def test_mesh_resolution():
    assert MeshConfig(data=-1, fsdp=4).resolve(8) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
    assert MeshConfig(data=2, fsdp=2, tensor=2).resolve(8) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
    assert MeshConfig(data=1, fsdp=2, context=4).resolve(8) == {"data": 1, "fsdp": 2, "context": 4, "tensor": 1}
    with pytest.raises(ConfigError, match="has 4 devices but 8 are available"):
        MeshConfig(data=2, fsdp=2, tensor=1).resolve(8)
    with pytest.raises(ConfigError, match="does not divide"):
        MeshConfig(data=-1, fsdp=3).resolve(8)
    with pytest.raises(ConfigError, match="at most one mesh axis"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ConfigError, match="positive integer or -1"):
        MeshConfig(data=0)
    # hybrid sharding: FSDP inside groups of 4, 2 replicas
    assert MeshConfig(sharding_factor=4).resolve(8) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
    assert MeshConfig(sharding_factor=2, tensor=2).resolve(8) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
    with pytest.raises(ConfigError, match="not both"):
        MeshConfig(fsdp=2, sharding_factor=4)


def test_every_preset_is_valid_and_unknown_preset_is_clear():
    for name in MODEL_PRESETS:
        model_preset(name)
    with pytest.raises(ConfigError, match="unknown model preset 'gpt5'"):
        model_preset("gpt5")


def test_config_files_are_type_checked_and_overrides_parsed_by_type():
    with pytest.raises(ConfigError, match="model.use_bias must be true or false, got 'false'"):
        RunConfig.from_dict({"model": {"use_bias": "false"}})
    with pytest.raises(ConfigError, match="train.steps must be an integer, got 2.5"):
        RunConfig.from_dict({"train": {"steps": 2.5}})
    cfg = build_run_config(overrides=["model.use_bias=FALSE", "model.qk_norm=1", "train.peak_flops=null",
                                      "optim.lr=1e-3", "mesh.rules={\"embed\": null}"])
    assert cfg.model.use_bias is False and cfg.model.qk_norm is True and cfg.train.peak_flops is None
    assert cfg.optim.lr == 1e-3 and cfg.mesh.rules == {"embed": None}
    with pytest.raises(ConfigError, match="model.tie_embeddings takes true/false/1/0"):
        build_run_config(overrides=["model.tie_embeddings=no"])
    with pytest.raises(ConfigError, match="unknown field 'd_modle' in model"):
        build_run_config(overrides=["model.d_modle=3"])


def test_the_nano_preset_works_with_the_default_run():
    cfg = build_run_config(model_preset_name="nano")  # the default run's seq_len and data with the nano model
    assert cfg.model.max_seq_len >= cfg.train.seq_len and cfg.model.vocab_size >= 262


def test_every_config_field_declares_its_role():
    """Resume, parameter loading and HF import derive what may differ from the roles, so every field needs one."""
    for section in (ModelConfig, DataConfig, OptimConfig, TrainConfig, MeshConfig):
        instance = section()
        for f in dataclasses.fields(section):
            assert isinstance(role_of(instance, f.name), Role), f"{section.__name__}.{f.name} declares no role"
    assert set(RunConfig().roles()) == {f"{k}.{n}" for k, v in RunConfig().to_dict().items() for n in v}
    from gptjax.finetune import FinetuneConfig  # a fine-tune's settings too: its resume reads the same roles

    finetune = FinetuneConfig("pre", "classification", "train.jsonl", "test.jsonl", "run")
    assert set(finetune.roles()) == set(finetune.to_dict()) and all(isinstance(r, Role)
                                                                     for r in finetune.roles().values())


def test_a_field_without_a_role_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Section:
        size: int = 1

    with pytest.raises(ConfigError, match="Section.size declares no role"):
        role_of(Section(), "size")


def test_what_may_differ_is_derived_from_the_roles():
    from gptjax.interop.hf_import import SETTABLE_FIELDS
    from gptjax.training.checkpointing import RESUMABLE_ROLES

    roles = RunConfig().roles()
    resumable = {k for k, r in roles.items() if r in RESUMABLE_ROLES}
    # the mesh (context included), kernels, remat, cadence and the run's place may change on resume ...
    assert {"mesh.context", "mesh.context_strategy", "mesh.data", "model.remat", "model.attention_impl",
            "train.log_every", "train.checkpoint_every", "train.run_dir"} <= resumable
    # ... the parameters, their function and layout, and the optimizer trajectory may not
    assert not {"model.d_model", "model.rope_theta", "model.window", "model.scan_layers", "model.dtype",
                "optim.lr", "data.corpus", "train.seed", "train.batch_size"} & resumable
    # parameters load into a model whose only differences are not parameter-defining
    other = ModelConfig(d_model=128, rope_theta=500.0, remat="full", scan_layers=True, dtype="bfloat16")
    assert set(ModelConfig().parameter_differences(other)) == {"d_model"}
    assert not ModelConfig().parameter_differences(ModelConfig(max_seq_len=512))  # RoPE: no position table
    learned = ModelConfig(positions="learned")
    assert set(learned.parameter_differences(ModelConfig(positions="learned", max_seq_len=512))) == {"max_seq_len"}
    # HF import: what an HF config does not carry may be chosen anew
    assert set(SETTABLE_FIELDS) == {"z_loss", "dtype", "init_std", "scan_layers", "remat", "attention_impl",
                                    "attention_block", "loss_chunk"}


def test_context_strategy_moved_to_the_mesh_settings_and_old_configs_migrate():
    old = {"model": {"context_strategy": "ring"}, "mesh": {"context": 2}}
    cfg = RunConfig.from_dict(old)
    assert cfg.mesh.context_strategy == ContextStrategy.RING and "context_strategy" not in cfg.to_dict()["model"]
    assert cfg.to_dict()["mesh"]["context_strategy"] == "ring"  # plain data again: JSON-ready
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ConfigError, match="disagree; keep mesh.context_strategy"):
        RunConfig.from_dict({"model": {"context_strategy": "ring"}, "mesh": {"context_strategy": "zigzag"}})
    d = apply_overrides(RunConfig().to_dict(), ["model.context_strategy=zigzag"])  # an old command line
    assert d["mesh"]["context_strategy"] == "zigzag"
    with pytest.raises(ConfigError, match="context_strategy='spiral' is not valid; choose one of 'gather'"):
        MeshConfig(context_strategy="spiral")


def test_choice_types_are_the_one_definition_the_command_lines_read():
    from gptjax.cli.plan import main as plan_main  # noqa: F401  (builds its parser from the types)
    from gptjax.model import KERNELS

    assert set(choices(AttentionImpl)) == {"auto", *KERNELS}  # every kernel of the table is a config choice
    from gptjax.model.decoder import REMAT_POLICIES

    assert choices(Remat) == ("none", *REMAT_POLICIES)  # each policy of the model is a config choice
    assert choices(ContextStrategy) == ("gather", "ring", "zigzag")
    with pytest.raises(ConfigError, match="remat='some' is not valid; choose one of 'none', 'full', 'save_dots'"):
        ModelConfig(remat="some")


def test_the_batch_and_sequence_split_rule_is_the_configs():
    """"The batch divides data x fsdp, the sequence divides context" was written at the trainer, the memory plan,
    the distributed preflight and the compute plan's rounding; ``RunConfig.check_mesh_split`` is the rule."""
    from pathlib import Path

    import pytest

    from gptjax.config import ConfigError, RunConfig, batch_shards

    cfg = RunConfig().replace(train={"batch_size": 12, "seq_len": 96})
    cfg.check_mesh_split({"data": 2, "fsdp": 3, "context": 4, "tensor": 2})
    assert batch_shards({"data": 2, "fsdp": 3, "tensor": 4}) == 6
    with pytest.raises(ConfigError, match=r"train.batch_size=12 is not divisible by data x fsdp = 8"):
        cfg.check_mesh_split({"data": 2, "fsdp": 4, "context": 1})
    with pytest.raises(ConfigError, match=r"train.seq_len=96 is not divisible by mesh.context=5"):
        cfg.check_mesh_split({"data": 1, "fsdp": 1, "context": 5})
    package = Path(__file__).parents[1] / "gptjax"
    written = [str(p.relative_to(package)) for p in package.rglob("*.py")
               if '["data"] * ' in p.read_text() or "shape['data'] * " in p.read_text()]
    assert not written, written
