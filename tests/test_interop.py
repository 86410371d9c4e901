"""Hugging Face export / import: logit and greedy-generation parity with transformers for every family, import of
models built by transformers, bit-exact round trips both ways, the tokenizer, a trained default run, and bad input.

transformers and torch come from the ``interop`` extra (installed by ``make test``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ONE_DEVICE_ENV, ROOT, nano_model, run_cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)  # the other test worker has the other core

from gptjax.checkpoint import load_run  # noqa: E402
from gptjax.config import RunConfig, TrainConfig  # noqa: E402
from gptjax.data.corpus import default_corpus_path, read_corpus, split_documents  # noqa: E402
from gptjax.data.tokenizer import Tokenizer  # noqa: E402
from gptjax.inference import Engine, GenerationConfig  # noqa: E402
from gptjax.interop.export import ExportError, export_run  # noqa: E402
from gptjax.interop.families import UnsupportedArchitecture, family_for  # noqa: E402
from gptjax.interop.hf_import import HFImportError, read_hf  # noqa: E402
from gptjax.interop.safetensors import INDEX, Reader  # noqa: E402
from gptjax.model.decoder import stack_layers, unstack_layers  # noqa: E402
from gptjax.model.sharded import ShardedModel  # noqa: E402
from gptjax.sharding.mesh import single_device_mesh  # noqa: E402
from gptjax.training.seed import seed_run  # noqa: E402

VOCAB = 512
# One small config per HF family (and the variants that change the mapping): GQA / MQA, biases, untied, qk-norm
# with banded layers, scan-stacked layout, GPT-2, GPT-Neo with an odd layer count.
FAMILIES = {
    "llama": dict(),
    "llama-mqa-bias-untied": dict(n_kv_heads=1, use_bias=True, tie_embeddings=False),
    "qwen3-banded-scan": dict(qk_norm=True, attention="alternating", window=8, scan_layers=True),
    "gpt2": dict(positions="learned", norm="layernorm", mlp="gelu", use_bias=True, n_kv_heads=None),
    "gpt2-untied-nobias": dict(positions="learned", norm="layernorm", mlp="gelu", n_kv_heads=None,
                               tie_embeddings=False),
    "gptneo": dict(positions="learned", norm="layernorm", mlp="gelu", use_bias=True, qkv_bias=False,
                   n_kv_heads=None, attention="alternating", window=8, n_layers=3),
}
ARCH = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel",
        "gptneo": "GPTNeoForCausalLM"}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    path = default_corpus_path()
    docs = split_documents(read_corpus(path), None)
    return Tokenizer.train(docs, VOCAB, sample_chars=300_000)


def random_params(model: ShardedModel, seed: int = 0) -> dict:
    """Per-layer params with every tensor perturbed (biases and norm scales too, which initialise to 0 / 1)."""
    params = jax.device_get(model.init_params(jax.random.key(seed)))
    if model.cfg.scan_layers:
        params = unstack_layers(params, model.cfg.n_layers)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (a + rng.normal(0, 0.05, a.shape)).astype(np.float32), params)


def make_run(tmp: Path, name: str, tokenizer: Tokenizer, **fields) -> tuple[RunConfig, ShardedModel, dict]:
    cfg = RunConfig(model=nano_model(vocab_size=VOCAB, **fields),
                    train=TrainConfig(run_dir=str(tmp / name), seq_len=64, batch_size=4, progress=False))
    model = ShardedModel(cfg.model, single_device_mesh())
    params = random_params(model)
    seed_run(cfg, params, tokenizer.proto, {"test": name})
    return cfg, model, params


def layout(model: ShardedModel, params: dict) -> dict:
    return stack_layers(params) if model.cfg.scan_layers else params


def cli(*args: str):
    """A console script in a subprocess on one CPU device."""
    return run_cli(*args, env=ONE_DEVICE_ENV)


def hf_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    config = transformers.GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), generation_config=config)
    return out[0, len(prompt):].tolist()


def assert_params_equal(a: dict, b: dict) -> None:
    fa = dict(jax.tree_util.tree_flatten_with_path(a)[0])
    fb = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert sorted(map(str, fa)) == sorted(map(str, fb))
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_logits_and_greedy_generation_match_transformers(tmp_path, tokenizer, name):
    cfg, model, params = make_run(tmp_path, name, tokenizer, **FAMILIES[name])
    sharded = name == "llama"  # one family through the sharded layout (index + several files)
    result = export_run(cfg.train.run_dir, tmp_path / "hf", dtype="float32",
                        max_shard_size="60KB" if sharded else "5GB", progress=False)
    assert result.architecture == ARCH[name.split("-")[0]]
    assert (tmp_path / "hf" / INDEX).is_file() == sharded and (len(result.files) > 1) == sharded
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf_model).__name__ == result.architecture

    tokens = np.random.default_rng(1).integers(0, VOCAB, (3, 48)).astype(np.int32)
    ours = np.asarray(model.forward(layout(model, params), jnp.asarray(tokens)))
    np.testing.assert_allclose(hf_logits(hf_model, tokens), ours, atol=1e-4, rtol=0)

    prompt = tokens[0, :8].tolist()
    engine = Engine(model, layout(model, params), slots=1)
    [ours] = engine.generate([prompt], GenerationConfig(max_new_tokens=32, temperature=0.0, stop_at_eos=False))
    assert hf_greedy(hf_model, prompt, 32) == ours.token_ids

    # import(export(y)) gives y's parameters back exactly (and its config, layout included)
    back = read_hf(tmp_path / "hf")
    assert back.model == cfg.model
    assert_params_equal(back.params, params)


MUP = dict(parametrization="mup", mup_base_width=16)  # nano's d_model 64: width multiplier 4


@pytest.mark.parametrize("name", ["llama", "qwen3-banded-scan", "gpt2-untied-nobias"])
def test_a_mup_model_off_its_base_width_exports_with_the_same_logits(tmp_path, tokenizer, name):
    """μP's logit multiplier 1/m is folded into lm_head (a tied model exports untied) and its extra attention
    factor 1/sqrt(m) into the query (the q-norm scale under qk_norm): transformers gives gptjax's logits, and the
    import is a standard model computing the same. Tied (lm_head made from the embedding), q_norm, and GPT-2's
    concatenated c_attn (only its q third scaled) with an untied head; GPT-Neo folds into q_proj as LLaMA does."""
    cfg, model, params = make_run(tmp_path, name, tokenizer, **FAMILIES[name], **MUP)
    assert cfg.model.width_mult == 4
    export_run(cfg.train.run_dir, tmp_path / "hf", progress=False)
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["tie_word_embeddings"] is False and "μP" in hf_cfg["gptjax"]["folded"]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 40)).astype(np.int32)
    ours = np.asarray(model.forward(layout(model, params), jnp.asarray(tokens)))
    np.testing.assert_allclose(hf_logits(hf_model, tokens), ours, atol=1e-4, rtol=0)
    # without the folds the logits would differ by far more than the tolerance: the test can fail
    plain = ShardedModel(dataclasses.replace(cfg.model, parametrization="standard"), single_device_mesh())
    assert np.abs(np.asarray(plain.forward(layout(model, params), jnp.asarray(tokens))) - ours).max() > 1e-2
    back = read_hf(tmp_path / "hf")
    assert back.model.parametrization == "standard" and not back.model.tie_embeddings
    imported = ShardedModel(back.model, single_device_mesh())
    got = np.asarray(imported.forward(layout(imported, back.params), jnp.asarray(tokens)))
    np.testing.assert_allclose(got, ours, atol=1e-4, rtol=0)


def test_export_bfloat16_and_tokenizer(tmp_path, tokenizer):
    cfg, model, params = make_run(tmp_path, "bf16", tokenizer)
    export_run(cfg.train.run_dir, tmp_path / "hf", dtype="bfloat16", progress=False)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf_model.dtype == torch.bfloat16
    assert Reader(tmp_path / "hf").entries["model.embed_tokens.weight"][1]["dtype"] == "BF16"

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.eos_token_id == tokenizer.eos_id
    paragraphs = [p for p in read_corpus(default_corpus_path()).split("\n\n") if p.strip()]
    sample = paragraphs[::7] + ["\nleading newline", "  two  spaces ", "digits 1811 and £5, ünïcödé 漢字\ttab", "end\n"]
    mismatched = [t for t in sample if hf_tok.encode(t, add_special_tokens=False) != tokenizer.encode(t)]
    assert not mismatched, mismatched[:3]
    assert all(hf_tok.decode(tokenizer.encode(t)) == t for t in sample)


def _hf_models() -> dict:
    tf = transformers
    common = dict(vocab_size=VOCAB, max_position_embeddings=64)
    return {
        "llama": tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, **common)),
        "qwen3": tf.Qwen3ForCausalLM(tf.Qwen3Config(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
            head_dim=16, tie_word_embeddings=True, layer_types=["full_attention", "sliding_attention"],
            sliding_window=8, use_sliding_window=True, **common)),
        "gpt2": tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB)),
        "gptneo": tf.GPTNeoForCausalLM(tf.GPTNeoConfig(
            hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], window_size=8,
            **common)),
    }


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2", "gptneo"])
def test_import_models_built_by_transformers_and_round_trip(tmp_path, tokenizer, name):
    torch.manual_seed(0)
    hf_model = _hf_models()[name].eval()
    with torch.no_grad():  # HF initialises biases to 0 and norms to 1: perturb everything
        for p in hf_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf_model.save_pretrained(tmp_path / "x", max_shard_size="100KB" if name == "gpt2" else "5GB")

    imported = read_hf(tmp_path / "x")
    model = ShardedModel(imported.model, single_device_mesh())
    tokens = np.random.default_rng(2).integers(0, VOCAB, (2, 40)).astype(np.int32)
    ours = np.asarray(model.forward(layout(model, imported.params), jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, hf_logits(hf_model, tokens), atol=1e-4, rtol=0)

    # export(import(x)) reproduces x's tensors bit for bit
    cfg = RunConfig(model=imported.model, train=TrainConfig(run_dir=str(tmp_path / "run"), seq_len=64,
                                                             batch_size=4))
    seed_run(cfg, imported.params, tokenizer.proto, {"test": name})
    export_run(tmp_path / "run", tmp_path / "y", progress=False)
    x, y = Reader(tmp_path / "x"), Reader(tmp_path / "y")
    assert sorted(x.names()) == sorted(y.names())
    for n in x.names():
        a, b = x.read(n), y.read(n)
        assert a.dtype == b.dtype and a.shape == b.shape, n
        assert a.tobytes() == b.tobytes(), n


def test_import_cli_then_resume_training_and_sample(tmp_path, tokenizer, small_corpus):
    cfg, _, _ = make_run(tmp_path, "src", tokenizer)
    assert cli("export", "--run-dir", cfg.train.run_dir, "--out", str(tmp_path / "hf"),
                   "--no-progress").returncode == 0
    run = tmp_path / "imported"
    args = ["import_hf", str(tmp_path / "hf"), "--run-dir", str(run), "--set", f"data.corpus={small_corpus}",
            "--set", "train.steps=3", "--set", "train.batch_size=4", "--set", "train.seq_len=32",
            "--set", "train.progress=false", "--set", "train.sample_tokens=0", "--set", "train.tasks=",
            "--set", "train.peak_flops=1e11"]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json", "import.json", "tokenizer.model"]
    again = cli(*args)  # the same import again: a no-op
    assert again.returncode == 0 and "already holds this import" in again.stdout
    r = cli("train", "--run-dir", str(run), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["final_step"] == 3
    r = cli("sample", "--run-dir", str(run), "--tokens", "5", "--temperature", "0")
    assert r.returncode == 0 and r.stdout.startswith("It is a truth"), r.stderr[-2000:]


@pytest.mark.slow
def test_trained_default_run_exports_with_the_same_validation_loss(tmp_path, small_corpus):
    """The default run (its model, tokenizer and training settings) on a 300 KB slice of the corpus, 6 steps.
    (The full ``make train`` run was checked the same way by hand: README, "Export and import".)"""
    run = tmp_path / "austen"
    r = cli("train", "--run-dir", str(run), "--steps", "6", "--set", f"data.corpus={small_corpus}",
                "--set", "data.val_fraction=0.2",
                "--set", "train.progress=false",
                "--set", "train.sample_tokens=0", "--set", "train.tasks=", "--set", "train.eval_every=6",
                "--set", "train.peak_flops=1e11")
    assert r.returncode == 0, r.stderr[-2000:]
    assert cli("export", "--run-dir", str(run), "--out", str(tmp_path / "hf"), "--no-progress").returncode == 0
    from gptjax.data import eval_batches, run_corpus
    from gptjax.evals.loss import evaluate

    loaded = load_run(run)
    cfg = loaded.config
    val = run_corpus(cfg.data, cfg.model.vocab_size, run).stream("val")
    batches = eval_batches(val, cfg.train.seq_len, 4, 2)
    ours = evaluate(loaded.model, loaded.params, batches)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    V = cfg.model.vocab_size
    nll = [torch.nn.functional.cross_entropy(torch.tensor(hf_logits(hf_model, b["inputs"])).reshape(-1, V),
                                             torch.tensor(b["targets"], dtype=torch.long).reshape(-1),
                                             reduction="sum").item() for b in batches]
    theirs = sum(nll) / sum(b["targets"].size for b in batches)
    assert abs(ours - theirs) < 1e-4, (ours, theirs)


# ---- bad input: one clear error each, nothing half-written --------------------------------------------------
def _error(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    return lines[0]


def test_export_bad_input(tmp_path, tokenizer):
    out = tmp_path / "out"
    cfg, _, _ = make_run(tmp_path, "run", tokenizer)
    assert "no checkpoint for step 7" in _error(cli("export", "--run-dir", cfg.train.run_dir, "--step", "7",
                                                         "--out", str(out)))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(cfg.to_json())
    assert "no checkpoint" in _error(cli("export", "--run-dir", str(empty), "--out", str(out)))
    assert "gptjax run directory" in _error(cli("export", "--run-dir", str(tmp_path / "nothing"),
                                                    "--out", str(out)))
    bad = RunConfig(model=nano_model(vocab_size=VOCAB, norm="layernorm", n_kv_heads=None, positions="learned",
                                     mlp="swiglu"), train=TrainConfig(run_dir=str(tmp_path / "bad"), seq_len=64))
    with pytest.raises(UnsupportedArchitecture, match=r"GPT2LMHeadModel.*mlp=swiglu"):
        family_for(bad.model)
    seed_run(bad, random_params(ShardedModel(bad.model, single_device_mesh())), tokenizer.proto, {})
    assert "mlp=swiglu" in _error(cli("export", "--run-dir", str(tmp_path / "bad"), "--out", str(out)))
    with pytest.raises(UnsupportedArchitecture, match="q/k/v biases"):
        family_for(nano_model(positions="learned", norm="layernorm", mlp="gelu", use_bias=True, n_kv_heads=None,
                              attention="alternating"))
    with pytest.raises(UnsupportedArchitecture, match="alternating"):
        family_for(nano_model(attention="alternating"))
    # a non-export directory at --out is never overwritten
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a gptjax export"):
        export_run(cfg.train.run_dir, tmp_path / "keep", progress=False)
    assert not out.exists() and [p.name for p in (tmp_path / "keep").iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    # a second export to the same place replaces the first
    export_run(cfg.train.run_dir, out, progress=False)
    export_run(cfg.train.run_dir, out, progress=False)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_import_bad_input(tmp_path, tokenizer):
    cfg, _, _ = make_run(tmp_path, "run", tokenizer)
    export_run(cfg.train.run_dir, tmp_path / "hf", progress=False)
    hf = tmp_path / "hf"
    run = tmp_path / "new"

    def broken(name: str, edit) -> Path:
        d = tmp_path / name
        d.mkdir()
        for f in hf.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        edit(d)
        return d

    def drop_tensor(d: Path):  # rewrite the file without one tensor
        from gptjax.interop.safetensors import StreamWriter
        r = Reader(d)
        keep = [n for n in r.names() if n != "model.layers.1.mlp.up_proj.weight"]
        arrays = {n: r.read(n) for n in keep}
        with StreamWriter(d / "model.safetensors", {n: (a.shape, a.dtype) for n, a in arrays.items()}) as w:
            for n, a in arrays.items():
                w.write(n, a)

    def edit_config(**changes):
        def edit(d: Path):
            c = json.loads((d / "config.json").read_text())
            c.update(changes)
            (d / "config.json").write_text(json.dumps(c))
        return edit

    cases = {
        "missing": (drop_tensor, "model.layers.1.mlp.up_proj.weight"),
        "shape": (edit_config(intermediate_size=96), "has shape"),
        "arch": (edit_config(model_type="mistral"), "model_type 'mistral'"),
        "rope": (edit_config(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}), "rope_type='llama3'"),
        "act": (edit_config(hidden_act="gelu"), "hidden_act='gelu'"),
    }
    for name, (edit, expected) in cases.items():
        directory = broken(name, edit)
        if name == "missing":  # the CLI's form once: one line, exit 2, nothing written
            err = _error(cli("import_hf", str(directory), "--run-dir", str(run)))
            assert expected in err, (name, err)
        else:
            with pytest.raises((HFImportError, UnsupportedArchitecture)) as e:
                read_hf(directory)
            assert expected in str(e.value), (name, str(e.value))
        assert not run.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    with pytest.raises(HFImportError, match="config.json not found"):
        read_hf(tmp_path / "nowhere")
    with pytest.raises(HFImportError, match="no model.safetensors"):
        read_hf(broken("nofiles", lambda d: (d / "model.safetensors").unlink()))
    assert "cannot change model field" in _error(cli("import_hf", str(hf), "--run-dir", str(run),
                                                         "--set", "model.d_ff=96"))
    assert not run.exists()


def test_readme_documents_export_and_import():
    readme = (ROOT / "README.md").read_text()
    for text in ("gptjax-export", "gptjax-import", "LlamaForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel",
                 "GPTNeoForCausalLM"):
        assert text in readme, text


def test_export_is_the_same_from_any_layout_and_mesh(tmp_path, tokenizer):
    """A scan-stacked checkpoint written sharded over a (fsdp=2, tensor=2) mesh exports the same bytes as the
    per-layer checkpoint of the same parameters written on one device."""
    from gptjax.checkpoint.manager import Checkpointer
    from gptjax.config import MeshConfig
    from gptjax.sharding.mesh import make_mesh
    from gptjax.training.program import Program

    cfg, model, params = make_run(tmp_path, "one", tokenizer)
    sharded = RunConfig(model=nano_model(vocab_size=VOCAB, scan_layers=True), mesh=MeshConfig(data=1, fsdp=2, tensor=2),
                        train=TrainConfig(run_dir=str(tmp_path / "mesh"), seq_len=64, batch_size=4))
    program = Program(sharded, make_mesh(sharded.mesh, jax.devices()[:4]))
    state = program.init_from_params(program.model.put_params(stack_layers(params)))
    assert not state["params"]["blocks"]["attn"]["w_q"].sharding.is_fully_replicated
    checkpointer = Checkpointer(tmp_path / "mesh" / "checkpoints")
    checkpointer.save(5, state)
    checkpointer.close()
    (tmp_path / "mesh" / "config.json").write_text(sharded.to_json())
    tokenizer.save(tmp_path / "mesh" / "tokenizer.model")
    export_run(tmp_path / "one", tmp_path / "a", progress=False)
    export_run(tmp_path / "mesh", tmp_path / "b", progress=False)
    a, b = Reader(tmp_path / "a"), Reader(tmp_path / "b")
    assert a.names() == b.names()
    assert all(a.read(n).tobytes() == b.read(n).tobytes() for n in a.names())
