"""Console scripts, as a user runs them (subprocesses on one CPU device)."""

import json

from helpers import ONE_DEVICE_ENV, ROOT, cpu_env, run_cli
from gptjax.data.corpus import default_corpus_path

ENV = ONE_DEVICE_ENV


def test_console_scripts_are_registered():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    modules = {"train": "train", "sample": "sample", "plan": "plan", "plot": "plot", "scaling": "scaling",
               "export": "export", "import": "import_hf", "serve": "serve",
               "eval": "evaluate", "finetune": "finetune", "data": "data", "launch": "launch", "mup": "mup",
               "checkpoint": "checkpoint"}
    assert scripts == {f"gptjax-{name}": f"gptjax.cli.{module}:main" for name, module in modules.items()}
    for module in modules.values():
        assert (ROOT / "gptjax" / "cli" / f"{module}.py").exists()


def test_train_print_config_through_the_shared_builder(tmp_path):
    r = run_cli("train", "--model-preset", "tiny-gpt2", "--set", "train.steps=7", "--run-dir", str(tmp_path),
                "--print-config", env=ENV)
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["model"]["positions"] == "learned" and cfg["train"]["steps"] == 7
    assert cfg["train"]["run_dir"] == str(tmp_path)
    r = run_cli("train", "--config", str(ROOT / "experiments" / "austen.py"), "--print-config", env=ENV)
    assert json.loads(r.stdout)["train"]["run_dir"] == "runs/austen-experiment"
    r = run_cli("train", "--set", "model.d_modle=3", env=ENV)
    assert r.returncode == 2 and "unknown field 'd_modle' in model" in r.stderr and "Traceback" not in r.stderr
    # values are parsed by the field's type: the probes of the reliability issue
    r = run_cli("train", "--set", "model.use_bias=False", "--set", "model.n_kv_heads=null", "--print-config", env=ENV)
    cfg = json.loads(r.stdout)
    assert cfg["model"]["use_bias"] is False and cfg["model"]["n_kv_heads"] is None
    for bad, words in (("model.tie_embeddings=no", "model.tie_embeddings takes true/false/1/0"),
                       ("optim.lr=abc", "optim.lr takes a number"),
                       ("train.steps=1.5", "train.steps takes an integer")):
        r = run_cli("train", "--set", bad, "--print-config", env=ENV)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_sampling_arguments_are_checked(tmp_path):
    for args, words in ((["--temperature", "-1"], "temperature must be >= 0"), (["--top-p", "1.5"], "top_p must be in"),
                        (["--top-p", "0"], "top_p must be in"), (["--top-k", "-2"], "top_k must be an integer >= 0"),
                        (["--prompt", ""], "a --prompt is empty")):
        r = run_cli("sample", "--run-dir", str(tmp_path), *args, env=ENV)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_sample_and_plot_errors_are_one_line(tmp_path):
    r = run_cli("sample", "--run-dir", str(tmp_path), env=ENV)
    assert r.returncode == 2 and "is" in r.stderr and "gptjax run directory" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("plot", str(tmp_path), env=ENV)
    assert r.returncode == 2 and "no metrics.jsonl" in r.stderr


def train_briefly(tmp_path, steps: int):
    """A nano run trained for ``steps`` steps on the first 200 KB of the corpus (through gptjax-train)."""
    run, corpus = tmp_path / "run", tmp_path / "c.txt"
    text = default_corpus_path().read_text()
    corpus.write_text(text[: text.index("CHAPTER", 200_000)])
    r = run_cli("train", "--model-preset", "nano", "--set", "model.vocab_size=512", "--set", "train.seq_len=64",
                "--set", f"data.corpus={corpus}", "--steps", str(steps), "--run-dir", str(run), "--set",
                "train.batch_size=4", "--set", f"train.eval_every={steps}", "--set", "train.sample_tokens=0",
                "--set", "train.tasks=",
                "--set", "train.peak_flops=1e11", env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    return run


def test_sample_restores_params_only(tmp_path):
    """A run trained for a few steps: gptjax-sample loads its parameters and prints a continuation."""
    run = train_briefly(tmp_path, 4)
    assert (run / "tensorboard").is_dir() and (run / "curves.png").exists()
    r = run_cli("sample", "--run-dir", str(run), "--prompt", "Emma", "--tokens", "12", "--temperature", "0",
                env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("Emma") and len(r.stdout.strip()) > len("Emma")
    # the engine sized to the work: one prompt, one row (a 16-row engine made it pay a batch-16 step per token)
    assert "tokens/s, 1 slot, prefill" in r.stderr, r.stderr[-1000:]
    r = run_cli("sample", "--run-dir", str(run), "--prompt", "Emma", "--num-samples", "3", "--tokens", "4", env=ENV)
    assert r.returncode == 0 and "tokens/s, 3 slots, prefill" in r.stderr, r.stderr[-1000:]


def test_eval_perplexity_of_a_file_and_of_the_validation_split(tmp_path):
    """gptjax-eval on a short trained run: a text file (every token scored once, its bytes counted) and the run's
    own validation split; bad input is one line."""
    run = train_briefly(tmp_path, 2)
    text = default_corpus_path().read_text()
    sample = tmp_path / "emma.txt"
    sample.write_text(text[5000:8000], encoding="utf-8")
    r = run_cli("evaluate", "perplexity", "--run-dir", str(run), "--file", str(sample), "--stride", "32", "--json",
                env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    line, figures = r.stdout.strip().splitlines()
    got = json.loads(figures)
    assert got["bytes"] == len(text[5000:8000].encode()) and got["stride"] == 32 and "bits/byte" in line
    # windows of the model's context every 32 tokens, until one reaches the last token
    assert 0 < got["bits_per_byte"] < 12 and got["windows"] == -(-(got["tokens"] - got["context"]) // 32) + 1
    r = run_cli("evaluate", "perplexity", "--run-dir", str(run), "--split", "val", env=ENV)
    assert r.returncode == 0 and "the validation split" in r.stdout, r.stderr[-2000:]
    for args, words in ((["--file", str(tmp_path / "nope.txt")], "cannot read"),
                        (["--file", str(sample), "--stride", "0"], "stride must be in"),
                        (["--file", str(sample), "--context", "4096"], "longer than the model's max_seq_len")):
        r = run_cli("evaluate", "perplexity", "--run-dir", str(run), *args, env=ENV)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    # in-context tasks on the same run: each task and shot count a line, with JSON; on 2 devices the same numbers
    r = run_cli("evaluate", "tasks", "--run-dir", str(run), "--shots", "0", "1", "--limit", "6", "--json", env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    scores = [json.loads(x) for x in lines[1::2]]
    assert [(s["task"], s["shots"], s["n"]) for s in scores] == [("austen_cloze", 0, 6), ("austen_cloze", 1, 6),
                                                                 ("austen_next_sentence", 0, 6),
                                                                 ("austen_next_sentence", 1, 6)]
    assert lines[0].startswith("austen_cloze 0-shot: acc") and "chance" in lines[0]
    two = run_cli("evaluate", "tasks", "--run-dir", str(run), "--shots", "0", "1", "--limit", "6", "--json",
                  "--devices", "2", env=cpu_env(2))
    assert two.returncode == 0 and [json.loads(x) for x in two.stdout.strip().splitlines()[1::2]] == scores
    r = run_cli("evaluate", "tasks", "--run-dir", str(run), "--task", str(tmp_path), env=ENV)
    assert r.returncode == 2 and "no task.json there" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_launch_writes_nothing_it_would_regret(tmp_path):
    """--submit without sbatch wrote the job file although it said nothing was written; --time forever was
    accepted; --out replaced any file (a run's config.json too)."""
    import sys
    from pathlib import Path

    out = tmp_path / "job.sbatch"
    no_sbatch = {**ENV, "PATH": str(Path(sys.executable).parent)}
    r = run_cli("launch", "slurm", "--out", str(out), "--submit", "--", "gptjax-train", env=no_sbatch)
    assert r.returncode == 2 and "sbatch not found, so nothing was written" in r.stderr and not out.exists()
    r = run_cli("launch", "slurm", "--time", "forever", "--out", str(out), "--", "gptjax-train", env=ENV)
    assert r.returncode == 2 and "--time 'forever'" in r.stderr and not out.exists(), r.stderr
    for _ in range(2):  # its own file: written again
        r = run_cli("launch", "slurm", "--time", "2-00:00:00", "--out", str(out), "--", "gptjax-train", env=ENV)
        assert r.returncode == 0 and "#SBATCH --time=2-00:00:00" in out.read_text(), r.stderr
    mine = tmp_path / "config.json"
    mine.write_text("{}")
    r = run_cli("launch", "k8s", "--image", "im", "--out", str(mine), "--", "gptjax-train", env=ENV)
    assert r.returncode == 2 and "was not written by gptjax-launch" in r.stderr and mine.read_text() == "{}"
