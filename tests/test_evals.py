"""The one loss and held-out evaluation: masks, token weighting, agreement with the training loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_batch, tiny_program
from gptjax.evals.loss import evaluate
from gptjax.model.loss import next_token_loss


def test_next_token_loss_masks_and_weights_by_tokens():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 7, (2, 5)), jnp.int32)
    nll_all = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    full, aux = next_token_loss(logits, targets)
    assert float(full) == pytest.approx(float(nll_all.mean()), rel=1e-6) and float(aux["tokens"]) == 10
    mask = jnp.asarray([[1, 1, 0, 0, 0], [0, 0, 0, 1, 1]], jnp.float32)
    masked, aux = next_token_loss(logits, targets, mask)
    expected = (nll_all[0, :2].sum() + nll_all[1, 3:].sum()) / 4
    assert float(masked) == pytest.approx(float(expected), rel=1e-6)
    assert float(aux["nll_sum"]) == pytest.approx(float(expected) * 4, rel=1e-6) and float(aux["tokens"]) == 4
    empty, aux = next_token_loss(logits, targets, jnp.zeros((2, 5)))
    assert float(empty) == 0.0 and float(aux["z_loss"]) == 0.0  # no NaN from an empty mask
    # masked-out positions get no gradient
    g = jax.grad(lambda x: next_token_loss(x, targets, mask)[0])(logits)
    assert float(jnp.abs(g[0, 2:]).max()) == 0.0 and float(jnp.abs(g[0, :2]).max()) > 0


def test_evaluate_weights_batches_by_their_tokens():
    prog = tiny_program()
    params = prog.init(jax.random.key(0))["params"]
    a, b = random_batch(seed=1), random_batch(seed=2)
    b["loss_mask"][:, 8:] = 0  # a quarter of b's tokens count
    per = [prog.model.eval_step(params, prog.global_batch(x)) for x in (a, b)]
    expected = (float(per[0]["nll_sum"]) + float(per[1]["nll_sum"])) / (128 + 32)
    assert evaluate(prog.model, params, [a, b]) == pytest.approx(expected, rel=1e-6)
    # the training loss and the evaluation loss are the same function of (params, batch)
    _, m = prog.train_step(prog.init(jax.random.key(0)), prog.global_batch(a))
    assert float(m["loss"]) == pytest.approx(evaluate(prog.model, params, [a]), rel=1e-6)


# ---- perplexity and bits-per-byte with a sliding window ------------------------------------------------------
def test_sliding_windows_score_every_token_once_with_the_stated_context():
    from gptjax.evals.perplexity import windows

    for n, context, stride in ((1, 8, 8), (40, 16, 5), (40, 16, 16), (100, 32, 7), (16, 16, 3)):
        scored = []
        for i, (start, first) in enumerate(windows(n, context, stride)):
            end = min(start + context, n)
            scored += range(first, end)
            if i:  # after the first window each scored target has at least context - stride tokens before it
                assert first - start >= context - stride
        assert scored == list(range(n))
    with pytest.raises(ValueError, match="stride must be in"):
        windows(10, 8, 9)


def test_sliding_window_log_loss_is_the_full_forward_pass_over_each_window():
    """Against brute force: each target's log-probability from a forward pass over exactly the tokens its window
    gives it, summed; bits-per-byte are that sum over ln 2 times the bytes."""
    from gptjax.evals.perplexity import score_ids, windows
    from gptjax.model import ShardedModel
    from gptjax.sharding import single_device_mesh

    from helpers import nano_model

    model = ShardedModel(nano_model(max_seq_len=16), single_device_mesh())
    params = model.init_params(jax.random.key(0))
    ids = np.random.default_rng(0).integers(0, 512, 41)
    for context, stride in ((16, 5), (16, 16), (8, 3)):
        score = score_ids(model, params, ids, context, stride, batch_size=3, n_bytes=123)
        expected = 0.0
        for start, first in windows(len(ids) - 1, context, stride):
            end = min(start + context, len(ids) - 1)
            logp = jax.nn.log_softmax(model.forward(params, jnp.asarray(ids[None, start:end]))[0])
            expected -= sum(float(logp[t - start, ids[t + 1]]) for t in range(first, end))
        assert score.tokens == 40 and score.nll == pytest.approx(expected, rel=1e-5)
        assert score.bits_per_byte == pytest.approx(expected / (np.log(2) * 123), rel=1e-5)
        assert score.perplexity == pytest.approx(np.exp(expected / 40), rel=1e-5)
    with pytest.raises(ValueError, match="longer than the model's max_seq_len"):
        score_ids(model, params, ids, 32, 8)
