import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_program
from gptjax.inference.sample import filter_logits, generate


def test_sampling_filters():
    logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
    k2 = filter_logits(logits, 1.0, 2, 1.0)
    assert list(np.isfinite(np.asarray(k2)) & (np.asarray(k2) > -1e30)) == [True, True, False, False]
    p = np.asarray(filter_logits(logits, 1.0, 0, 0.75))  # nucleus: 0.5 + 0.3 reaches 0.75
    assert list(p > -1e30) == [True, True, False, False]
    p = np.asarray(filter_logits(logits, 1.0, 0, 0.4))  # the best token alone already exceeds 0.4
    assert list(p > -1e30) == [True, False, False, False]


def test_generate_greedy_is_deterministic_and_top_k_1_is_greedy():
    prog = tiny_program()
    params = prog.init(jax.random.key(0))["params"]
    a = generate(prog.model.forward, params, [5, 6, 7], 10, 64, temperature=0.0)
    b = generate(prog.model.forward, params, [5, 6, 7], 10, 64, temperature=0.0)
    c = generate(prog.model.forward, params, [5, 6, 7], 10, 64, temperature=1.0, top_k=1, seed=3)
    assert a == b == c and len(a) == 10
    logits = prog.model.forward(params, jnp.asarray([[5, 6, 7]]))
    assert a[0] == int(jnp.argmax(logits[0, -1]))
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(prog.model.forward, params, [], 5, 64)
    for kw, words in ((dict(temperature=-0.5), "temperature must be >= 0"), (dict(top_p=0.0), "top_p must be in"),
                      (dict(top_p=1.2), "top_p must be in"), (dict(top_k=-1), "top_k must be")):
        with pytest.raises(ValueError, match=words):
            generate(prog.model.forward, params, [5], 5, 64, **kw)
