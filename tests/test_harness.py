"""The lm-evaluation-harness backend (``gptjax.evals.harness``) against the harness's own ``hf`` backend on the
exported checkpoint: the same per-request log-likelihoods (within 1e-4), accuracies, rolling log-likelihoods
and greedy generations; and ``gptjax-eval harness`` on the built-in tasks through the harness's command line."""

import os

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks are local JSONL; nothing is downloaded

import lm_eval  # noqa: E402 - the eval extra, which the test command installs
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from helpers import ONE_DEVICE_ENV, run_cli, small_run  # noqa: E402

TASKS = ["austen_cloze", "austen_next_sentence"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_corpus):
    from gptjax.interop.export import export_run
    from gptjax.training.trainer import train

    tmp = tmp_path_factory.mktemp("harness")
    cfg = small_run(tmp / "run", small_corpus, steps=30, eval_every=30, checkpoint_every=30)
    train(cfg)
    export_run(tmp / "run", tmp / "hf")
    return tmp / "run", tmp / "hf"


@pytest.fixture(scope="module")
def models(exported):
    import gptjax.evals.harness as harness

    run, hf = exported
    return harness.GptjaxLM(run_dir=str(run), rows=4), HFLM(pretrained=str(hf), dtype="float32", device="cpu",
                                                             batch_size=8)


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    from gptjax.evals.tasks import BUILTIN, builtin_tasks_dir, write_harness_yaml

    out = tmp_path_factory.mktemp("yaml")
    for name in BUILTIN:
        write_harness_yaml(builtin_tasks_dir() / name, out)
    return TaskManager(include_path=str(out))


def test_loglikelihoods_and_accuracy_match_the_hf_backend_on_the_export(models, task_manager):
    """Every request of both built-in tasks, one-shot (prompts up to the model's context, some cut on the left):
    gptjax's packed log-likelihoods against transformers' on the exported checkpoint, through the harness."""
    results = [lm_eval.simple_evaluate(model=lm, tasks=TASKS, limit=24, num_fewshot=1, log_samples=True,
                                       task_manager=task_manager, bootstrap_iters=0) for lm in models]
    for task in TASKS:
        ours, theirs = ([r for s in res["samples"][task] for r in s["resps"]] for res in results)
        assert len(ours) == len(theirs) >= 24
        lp = np.array([[r[0][0] for r in ours], [r[0][0] for r in theirs]])
        assert np.abs(lp[0] - lp[1]).max() < 1e-4
        assert [r[0][1] for r in ours] == [r[0][1] for r in theirs]  # the greedy flags too
        for metric, value in results[1]["results"][task].items():
            if metric.startswith("acc") and "stderr" not in metric:
                assert results[0]["results"][task][metric] == value, (task, metric)


def test_rolling_loglikelihood_and_greedy_generation_match_the_hf_backend(models, small_corpus):
    text = small_corpus.read_text()[5000:7000]  # longer than the model's context: several rolling windows
    rolling = [Instance("loglikelihood_rolling", {}, (t,), 0) for t in (text, "A short one.")]
    ours, theirs = (lm.loglikelihood_rolling(rolling, disable_tqdm=True) for lm in models)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)
    assert ours[0] < ours[1] < 0
    prompts = ["It is a truth universally", "Emma Woodhouse, handsome,", "\"My dear"]
    for until in (["zzz"], ["\n\n\n", "zzz"]):  # (this briefly trained model's greedy text is mostly newlines)
        gen = [Instance("generate_until", {}, (p, {"until": until, "max_gen_toks": 12, "do_sample": False}), i)
               for i, p in enumerate(prompts)]
        ours, theirs = (lm.generate_until(gen, disable_tqdm=True) for lm in models)
        assert ours == theirs
        assert not any(u in o for o in ours for u in until)  # cut at the stop strings


def test_gptjax_eval_harness_runs_the_builtin_tasks(exported, tmp_path):
    run, _ = exported
    r = run_cli("evaluate", "harness", "--model", "gptjax", "--model_args", f"run_dir={run}", "--tasks",
                ",".join(TASKS), "--limit", "8", "--output_path", str(tmp_path / "out"),
                env={**ONE_DEVICE_ENV, "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "austen_next_sentence" in r.stdout and "acc_norm" in r.stdout
    assert list((tmp_path / "out").rglob("results_*.json"))
