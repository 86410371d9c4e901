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
