"""The generation engine: cached decoding equals the full forward pass for every architecture, batching (static
and continuous) equals one prompt at a time, sampled and speculatively sampled tokens follow the filtered target
distribution (chi-square tests with fixed seeds), greedy speculative decoding equals greedy decoding, a mesh equals
one device, and stop strings, end of sequence, streaming, cancellation and refusals behave as documented."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import nano_model
from gptjax.config import MeshConfig
from gptjax.data.tokenizer import Tokenizer
from gptjax.inference import Engine, GenerationConfig, GenerationError, RowSettings, filter_logits
from gptjax.inference.sampling import NEG
from gptjax.model import ShardedModel
from gptjax.sharding.mesh import make_mesh, single_device_mesh

GREEDY = GenerationConfig(max_new_tokens=8, temperature=0.0)
P_FLOOR = 1e-4  # a chi-square test fails below this p-value: a correct sampler fails one in 10,000 seeds


def model_and_params(seed: int = 0, mesh=None, **model_kw):
    model = ShardedModel(nano_model(max_seq_len=64, **model_kw), mesh or single_device_mesh())
    return model, model.init_params(jax.random.key(seed))


def full_forward_greedy(model, params, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(jnp.argmax(model.forward(params, jnp.asarray([ids]))[0, -1])))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def tokenizer(small_corpus):
    return Tokenizer.train([small_corpus.read_text()], vocab_size=512)


# ---- the generation config ----------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, words", [
    ("temperature", -0.5, "temperature must be >= 0"), ("top_p", 0.0, "top_p must be in (0, 1]"),
    ("top_p", 1.2, "top_p must be in (0, 1]"), ("top_k", -1, "top_k must be an integer >= 0"),
    ("repetition_penalty", 0.0, "repetition_penalty must be > 0"), ("max_new_tokens", -1, "max_new_tokens must be"),
    ("stop", ("",), "stop strings must be non-empty"), ("seed", 1.5, "seed must be an integer")])
def test_the_generation_config_refuses_what_it_cannot_mean(field, value, words):
    with pytest.raises(GenerationError, match=words.replace("(", r"\(").replace(")", r"\)")):
        GenerationConfig(**{field: value})


def test_requests_that_do_not_fit_are_refused_with_the_numbers(tokenizer):
    model, params = model_and_params()
    engine = Engine(model, params, tokenizer, slots=1)
    with pytest.raises(GenerationError, match="the prompt is empty"):
        engine.request("")
    with pytest.raises(GenerationError, match="the prompt is empty"):
        engine.request([])
    with pytest.raises(GenerationError, match=r"token ids must be in \[0, 512\)"):
        engine.request([3, 512])
    with pytest.raises(GenerationError, match="the prompt has 60 tokens and 10 new ones were asked for: more than "
                                              "the model's context of 64 tokens; ask for at most 4 new tokens"):
        engine.request([1] * 60, GenerationConfig(max_new_tokens=10))
    with pytest.raises(GenerationError, match="shorten the prompt"):
        engine.request([1] * 70, GenerationConfig(max_new_tokens=1))
    with pytest.raises(GenerationError, match="a text prompt needs a tokenizer"):
        Engine(model, params, slots=1).request("Emma")
    with pytest.raises(GenerationError, match="max_len=65 must be in"):
        Engine(model, params, slots=1, max_len=65)
    other, other_params = model_and_params(vocab_size=256)
    with pytest.raises(GenerationError, match="vocabulary"):
        Engine(model, params, draft=(other, other_params))


def test_filter_logits_applies_each_rows_own_settings():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4))
    configs = [GenerationConfig(top_k=2), GenerationConfig(top_p=0.75), GenerationConfig(top_p=0.4),
               GenerationConfig(temperature=2.0)]
    kept = np.asarray(filter_logits(logits, RowSettings.of(configs, [[0]] * 4))) > -1e30
    assert kept.tolist() == [[True, True, False, False], [True, True, False, False],  # 0.5 + 0.3 reaches 0.75
                             [True, False, False, False], [True] * 4]  # the best token alone exceeds 0.4
    scaled = np.asarray(filter_logits(logits, RowSettings.of(configs, [[0]] * 4)))[3]
    np.testing.assert_allclose(scaled, np.log([0.5, 0.3, 0.15, 0.05]) / 2.0, rtol=1e-6)


# ---- cached decoding equals the full forward pass -----------------------------------------------------------
VARIANTS = {
    "mha": dict(n_kv_heads=None),
    "gqa": {},
    "mqa": dict(n_kv_heads=1),
    "learned-layernorm-gelu": dict(positions="learned", norm="layernorm", mlp="gelu", use_bias=True),
    "gpt3-banded-scan": dict(positions="learned", norm="layernorm", mlp="gelu", attention="alternating", window=5,
                             scan_layers=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_greedy_decoding_is_the_full_forward_pass_at_every_position(variant):
    """Every token the engine generates is the argmax of the full forward pass over prompt + tokens so far, and
    its reported log-probability is that pass's (float32: 1e-4)."""
    model, params = model_and_params(**VARIANTS[variant])
    prompts = [[5, 6, 7], list(range(10, 31)), [9]]  # 21 tokens: a 32-token bucket, past the window of 5
    engine = Engine(model, params, slots=2)
    for prompt, c in zip(prompts, engine.generate(prompts, GenerationConfig(max_new_tokens=12, temperature=0.0))):
        seq = prompt + c.token_ids
        lp = jax.nn.log_softmax(model.forward(params, jnp.asarray([seq]))[0], axis=-1)
        at = np.arange(len(prompt) - 1, len(seq) - 1)
        assert c.token_ids == [int(t) for t in jnp.argmax(lp[at], axis=-1)]
        np.testing.assert_allclose(c.logprobs, lp[at, c.token_ids], atol=1e-4)
        assert [max(t, key=t.get) for t in c.top_logprobs] == c.token_ids and c.finish_reason == "length"


def test_bfloat16_generation_tracks_its_full_forward_pass():
    model, params = model_and_params(dtype="bfloat16")
    c = Engine(model, params, slots=1).generate([[3, 1, 4, 1, 5]], GenerationConfig(max_new_tokens=10,
                                                                                     temperature=0.0))[0]
    assert model.init_cache(1, 8).k_BxKxHxS[0].dtype == jnp.bfloat16
    seq = [3, 1, 4, 1, 5] + c.token_ids
    lp = jax.nn.log_softmax(model.forward(params, jnp.asarray([seq]))[0], axis=-1)
    at = np.arange(4, len(seq) - 1)
    np.testing.assert_allclose(c.logprobs, lp[at, c.token_ids], atol=0.05)  # bf16 rounding, not a different model
    assert np.all(lp[at, c.token_ids] >= lp[at].max(axis=-1) - 0.05)  # each token is (within rounding) the argmax


def test_prompt_logprobs_are_the_full_forward_pass(tokenizer):
    model, params = model_and_params()
    engine = Engine(model, params, tokenizer, slots=1)
    request = engine.submit(engine.request([7, 8, 9, 10], GenerationConfig(max_new_tokens=0), prompt_logprobs=True))
    while engine.busy:
        engine.step()
    c = request.completion
    lp = jax.nn.log_softmax(model.forward(params, jnp.asarray([[7, 8, 9, 10]]))[0], axis=-1)
    assert c.prompt_logprobs[0] is None and c.prompt_top_logprobs[0] is None and c.token_ids == []
    np.testing.assert_allclose(c.prompt_logprobs[1:], [lp[0, 8], lp[1, 9], lp[2, 10]], atol=1e-5)
    assert max(c.prompt_top_logprobs[2], key=c.prompt_top_logprobs[2].get) == int(jnp.argmax(lp[1]))
    assert c.finish_reason == "length"


# ---- batching --------------------------------------------------------------------------------------------------
def test_batched_and_continuous_batching_equal_one_prompt_at_a_time():
    """Seven prompts of different lengths in two slots (each finished row takes the next prompt while the other
    decodes), with per-request settings mixed in one batch: every request gets the tokens it gets alone."""
    model, params = model_and_params()
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 512, n)) for n in (3, 17, 1, 9, 30, 5, 12)]
    configs = [GenerationConfig(max_new_tokens=n, temperature=t, top_k=k, top_p=p, seed=s, repetition_penalty=r)
               for n, t, k, p, s, r in zip((6, 9, 4, 12, 5, 7, 8), (1.0, 0.0, 0.7, 1.3, 1.0, 0.9, 1.0),
                                           (0, 0, 20, 0, 5, 0, 0), (1.0, 1.0, 1.0, 0.9, 1.0, 0.8, 1.0),
                                           range(7), (1.0, 1.0, 1.0, 1.0, 1.3, 1.0, 1.5))]
    together = Engine(model, params, slots=2)
    requests = [together.submit(together.request(p, c)) for p, c in zip(prompts, configs)]
    while together.busy:
        together.step()
    alone = Engine(model, params, slots=1)
    for p, c, r in zip(prompts, configs, requests):
        one = alone.generate([p], c)[0]
        assert r.completion.token_ids == one.token_ids and len(one.token_ids) == c.max_new_tokens
        np.testing.assert_allclose(r.completion.logprobs, one.logprobs, atol=1e-5)
    assert [r.completion.token_ids for r in requests[:2]] != [one.token_ids] * 2  # rows are not all alike
    assert_nothing_recompiles(Engine(model, params, slots=2))
    # the greedy row is the full forward pass's greedy continuation
    assert requests[1].completion.token_ids == full_forward_greedy(model, params, prompts[1], 9)


def test_prompts_prefilled_together_equal_prompts_prefilled_alone():
    """Three prompts of one length bucket (16) are prefilled in one call (a batch of 4 whose last row is dropped);
    with ``prefill_tokens=16``, one prompt a call. Either way each gets the tokens, log-probabilities and prompt
    scores it gets alone."""
    model, params = model_and_params()
    prompts = [[5, 6, 7], [8] * 9, list(range(20, 32))]
    config = GenerationConfig(max_new_tokens=6, temperature=1.0, seed=3)

    def run(engine):
        requests = [engine.submit(engine.request(p, config, prompt_logprobs=True)) for p in prompts]
        while engine.busy:
            engine.step()
        return [r.completion for r in requests]

    alone = [Engine(model, params, slots=1).generate([p], config)[0] for p in prompts]
    for engine in (Engine(model, params, slots=4), Engine(model, params, slots=4, prefill_tokens=16)):
        for got, one, p in zip(run(engine), alone, prompts):
            assert got.token_ids == one.token_ids
            np.testing.assert_allclose(got.logprobs, one.logprobs, atol=1e-5)
            logp = np.asarray(jax.nn.log_softmax(model.forward(params, jnp.asarray([p]))[0]))
            np.testing.assert_allclose(got.prompt_logprobs[1:], [logp[t, p[t + 1]] for t in range(len(p) - 1)],
                                       atol=1e-4)


def test_the_same_seed_draws_independently_for_different_prompts():
    model, params = model_and_params(tie_embeddings=False)
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]
    out = Engine(model, params, slots=4).generate(prompts, GenerationConfig(max_new_tokens=24, temperature=5.0))
    # near-uniform draws (temperature 5) from 512 tokens: equal tokens at one position are rare, not the rule
    same = sum(a == b for x, y in itertools.combinations(out, 2) for a, b in zip(x.token_ids, y.token_ids))
    assert same <= 3, same


def test_repetition_penalty_discourages_seen_tokens():
    model, params = model_and_params()
    prompt = [5, 6, 7]
    plain = Engine(model, params, slots=1).generate([prompt], GREEDY.replace(max_new_tokens=16))[0].token_ids
    penalised = Engine(model, params, slots=1).generate(
        [prompt], GREEDY.replace(max_new_tokens=16, repetition_penalty=50.0))[0].token_ids
    assert len(set(plain)) < 16  # an untrained model repeats itself ...
    assert len(set(penalised)) == 16 and not set(penalised) & set(prompt)  # ... and the penalty forbids it


# ---- sampling distributions --------------------------------------------------------------------------------
def peaked(seed: int):
    """A vocabulary-8 model whose next-token distributions are far from uniform and depend on the context."""
    model = ShardedModel(nano_model(vocab_size=8, max_seq_len=16, tie_embeddings=False), single_device_mesh())
    params = model.init_params(jax.random.key(seed))
    params["final_norm"]["scale"] = params["final_norm"]["scale"] * 12
    return model, params


def exact_marginals(model, params, prompt, steps, config):
    """The probability of each token at each of the first ``steps`` positions under ``config``'s filtered
    distribution, by enumerating every prefix."""
    settings = RowSettings.of([config], [prompt])
    marginals, prefixes = np.zeros((steps, 8)), {(): 1.0}
    for j in range(steps):
        keys = list(prefixes)
        logits = model.forward(params, jnp.asarray([prompt + list(k) for k in keys]))[:, -1]
        probs = np.asarray(jax.nn.softmax(filter_logits(logits, jax.tree.map(
            lambda x: np.repeat(x, len(keys), axis=0), settings)), axis=-1))
        prefixes = {k + (v,): prefixes[k] * probs[i, v] for i, k in enumerate(keys) for v in range(8)}
        for k, p in prefixes.items():
            marginals[j, k[-1]] += p
    return marginals


def chi_square_p(counts, expected_probs) -> float:
    """The p-value of the observed counts under the expected distribution (cells with expected count < 5 pooled);
    0 if a token of probability zero was drawn."""
    n = counts.sum()
    expected = expected_probs * n
    if np.any(counts[expected_probs == 0] > 0):
        return 0.0
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    stat = np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep])
    return float(jax.scipy.stats.chi2.sf(stat, keep.sum() - 1))


def draw(engine, prompt, config, n):
    out = engine.generate([prompt] * n, config, seeds=range(n))
    return np.asarray([c.token_ids for c in out])


def test_sampled_tokens_follow_the_filtered_softmax():
    """1024 draws of three tokens with temperature, top-k and top-p: each position's tokens match the exact
    filtered distribution (chi-square p > 1e-4), never a filtered-out token, and not the unfiltered softmax."""
    model, params = peaked(0)
    prompt, config = [1, 2, 3], GenerationConfig(max_new_tokens=3, temperature=0.8, top_k=5, top_p=0.9)
    tokens = draw(Engine(model, params, slots=128), prompt, config, 1024)
    exact = exact_marginals(model, params, prompt, 3, config)
    plain = exact_marginals(model, params, prompt, 3, GenerationConfig(temperature=1.0))
    for j in range(3):
        counts = np.bincount(tokens[:, j], minlength=8)
        assert chi_square_p(counts, exact[j]) > P_FLOOR, (j, counts, exact[j])
        assert chi_square_p(counts, plain[j]) < P_FLOOR  # the test tells the filtered from the unfiltered


def sorted_filter(logits_BxV, settings):
    """The sort-based rule the bisection in ``filter_logits`` replaces: keep the k best (ties with the k-th too),
    then the smallest prefix of the rest, most likely first, whose mass reaches top_p (top_p = 1: all)."""
    t = np.where(settings.temperature_B > 0, settings.temperature_B, 1)[:, None]
    logits = np.asarray(logits_BxV, np.float32) / t.astype(np.float32)
    out = np.full(logits.shape, float(NEG))
    for b, row in enumerate(logits.astype(np.float32)):
        k = settings.top_k_B[b] if 0 < settings.top_k_B[b] < len(row) else len(row)
        kept = row >= np.sort(row)[::-1][k - 1]
        p = np.where(kept, np.exp(row - row.max()), 0.0)
        p /= p.sum()
        if settings.top_p_B[b] < 1:
            more = np.array([p[row > x].sum() for x in row])  # mass of the strictly more likely tokens
            kept &= more < settings.top_p_B[b]
        out[b, kept] = row[kept]
    return out


def test_top_k_and_top_p_by_bisection_keep_what_sorting_keeps():
    rng = np.random.default_rng(3)
    for V in (8, 100, 1000):
        logits = (rng.normal(size=(12, V)) * rng.uniform(0.2, 8, (12, 1))).astype(np.float32)
        logits[0, :4] = logits[0, 0]  # ties
        configs = [GenerationConfig(temperature=float(rng.uniform(0.3, 2)), top_k=int(rng.choice([0, 1, 3, 50])),
                                    top_p=float(rng.choice([1.0, 0.5, 0.9, 0.05]))) for _ in range(12)]
        settings = RowSettings.of(configs, [[1]] * 12)
        ours = np.asarray(jax.jit(filter_logits)(jnp.asarray(logits), settings))
        ref = sorted_filter(logits, settings)
        np.testing.assert_array_equal(ours == NEG, ref == NEG)
        np.testing.assert_allclose(ours[ours != NEG], ref[ref != NEG], rtol=1e-6)


def test_speculative_sampling_keeps_the_target_distribution():
    """Leviathan et al.'s accept/reject rule: with a draft model whose distributions differ from the target's
    (total variation 0.1-0.3 per position), the tokens follow the target's distribution, not the draft's."""
    model, params = peaked(0)
    draft_model, draft_params = peaked(1)
    prompt, config = [1, 2, 3], GenerationConfig(max_new_tokens=4, temperature=1.0)
    engine = Engine(model, params, slots=128, draft=(draft_model, draft_params), draft_tokens=3)
    tokens = draw(engine, prompt, config, 1024)
    target = exact_marginals(model, params, prompt, 4, config)
    proposal = exact_marginals(draft_model, draft_params, prompt, 4, config)
    for j in range(1, 4):  # the first token comes from the prefill; the rest from speculative rounds
        counts = np.bincount(tokens[:, j], minlength=8)
        assert chi_square_p(counts, target[j]) > P_FLOOR, (j, counts, target[j])
        assert chi_square_p(counts, proposal[j]) < P_FLOOR
    acceptance = engine.stats.acceptance
    assert np.all((acceptance > 0.1) & (acceptance < 0.95)), acceptance  # real rejections were exercised


@pytest.mark.parametrize("variant", ["gqa", "gpt3-banded-scan"])
def test_speculative_greedy_is_plain_greedy_token_for_token(variant):
    # untied: a freshly initialised tied model's greedy choice is mostly its last token, so any two agree
    model, params = model_and_params(tie_embeddings=False, **VARIANTS[variant])
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, 512, n)) for n in (4, 11, 2, 7)]
    config = GenerationConfig(max_new_tokens=14, temperature=0.0)
    plain = Engine(model, params, slots=2).generate(prompts, config)
    assert len({t for c in plain for t in c.token_ids}) > 8  # greedy output that is not one repeated token
    other = model.init_params(jax.random.key(7))  # a different model: its proposals are mostly rejected
    for draft_params, expect_all_kept in ((params, True), (other, False)):
        engine = Engine(model, params, slots=2, draft=(model, draft_params), draft_tokens=3)
        out = engine.generate(prompts, config)
        assert [c.token_ids for c in out] == [c.token_ids for c in plain]
        for a, b in zip(out, plain):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
        assert np.all(engine.stats.acceptance == 1.0) == expect_all_kept, engine.stats.acceptance
    assert engine.stats.tokens_per_round < 2.0


# ---- sharded ---------------------------------------------------------------------------------------------------
def test_generation_on_a_mesh_equals_one_device():
    """data=2 x tensor=2 (simulated devices): the cache's rows over data and its KV heads over tensor; sampled
    tokens equal one device's, log-probabilities to float32 rounding."""
    one, params = model_and_params()
    mesh = make_mesh(MeshConfig(data=2, tensor=2), jax.devices()[:4])
    sharded, _ = model_and_params(mesh=mesh)
    sharded_params = sharded.put_params(jax.device_get(params))
    prompts = [[5, 6, 7], list(range(10, 30)), [1], [9, 9, 9, 9, 9], [3, 4]]
    config = GenerationConfig(max_new_tokens=8, temperature=1.0, top_k=40, seed=3)
    a = Engine(one, params, slots=4).generate(prompts, config)
    engine = Engine(sharded, sharded_params, slots=4)
    assert engine.cache.k_BxKxHxS[0].sharding.spec == jax.sharding.PartitionSpec("data", "tensor")
    assert engine.cache.v_BxKxSxH[0].sharding.spec == jax.sharding.PartitionSpec("data", "tensor")
    b = engine.generate(prompts, config)
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
    assert_nothing_recompiles(Engine(sharded, sharded_params, slots=4))


def assert_nothing_recompiles(engine):
    """A fresh engine's second batch of requests compiles nothing the first did not: neither the decode step, the
    prefill nor the cache insert. (Both prompts share a length bucket, so each batch is one prefill and one insert;
    the second insert gets the buffers the compiled steps placed, not those the engine started with.)"""
    sizes = lambda: (engine._decode._cache_size(), engine._prefill._cache_size(), engine._insert._cache_size())  # noqa
    prompts, config = [[1, 2, 3], [4, 5, 6, 7]], GenerationConfig(max_new_tokens=3, temperature=0.0)
    engine.generate(prompts, config)
    before = sizes()
    engine.generate(prompts, config)
    assert sizes() == before


# ---- text: stop strings, end of sequence, streaming, cancellation ---------------------------------------------
def test_stop_strings_are_cut_and_streaming_gives_the_same_text(tokenizer):
    model, params = model_and_params(vocab_size=tokenizer.vocab_size)
    engine = Engine(model, params, tokenizer, slots=2)
    config = GenerationConfig(max_new_tokens=30, temperature=1.0, seed=4)
    full = engine.generate(["Emma"], config)[0]
    assert full.finish_reason == "length" and len(full.text) > 10
    stop = full.text[len(full.text) // 2:][:3]
    cut = engine.generate(["Emma"], config.replace(stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    pieces = list(engine.stream("Emma", config.replace(stop=(stop,))))
    assert "".join(pieces) == cut.text and len(pieces) > 1
    assert "".join(engine.stream("Emma", config)) == full.text
    # the text continues the prompt: a word after the prompt keeps its space
    assert tokenizer.decode(tokenizer.encode("Emma") + full.token_ids) == "Emma" + full.text


def test_end_of_sequence_ends_a_row(tokenizer):
    model, params = model_and_params(vocab_size=tokenizer.vocab_size)
    engine = Engine(model, params, tokenizer, slots=1)
    first = engine.generate(["Emma"], GREEDY)[0].token_ids[0]
    engine.eos_id = first  # pretend the model's first greedy token is the end of sequence
    c = engine.generate(["Emma"], GREEDY)[0]
    assert c.token_ids == [] and c.finish_reason == "stop"
    assert len(engine.generate(["Emma"], GREEDY.replace(stop_at_eos=False))[0].token_ids) == 8


def test_a_cancelled_request_frees_its_slot_and_abort_ends_everything():
    model, params = model_and_params()
    engine = Engine(model, params, slots=1)
    long = engine.submit(engine.request([1, 2], GenerationConfig(max_new_tokens=40)))
    queued = engine.submit(engine.request([3, 4], GREEDY))
    engine.step()
    long.cancelled = True
    while engine.busy:
        engine.step()
    assert long.completion.finish_reason == "cancelled" and len(long.completion.token_ids) < 40
    assert queued.completion.token_ids == full_forward_greedy(model, params, [3, 4], 8)
    a = engine.submit(engine.request([1], GREEDY))
    b = engine.submit(engine.request([2], GREEDY))
    engine.step()
    engine.abort("device lost")
    assert all(r.done.is_set() and r.completion.finish_reason == "error" and r.completion.error == "device lost"
               for r in (a, b))
    assert engine.generate([[3, 4]], GREEDY)[0].token_ids == queued.completion.token_ids  # and it serves again
