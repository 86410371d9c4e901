"""gptjax-serve: the OpenAI-compatible server, started by the test, through the real ``openai`` client and plain
HTTP (urllib): its answers are the engine's, streamed or not; bad requests get a 4xx with a JSON error and the
server goes on; many concurrent requests are all answered, each as if it had been alone."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import openai
import pytest

from helpers import ONE_DEVICE_ENV, nano_model, run_cli
from gptjax.config import RunConfig, TrainConfig
from gptjax.data.corpus import read_corpus, split_documents
from gptjax.data.tokenizer import Tokenizer
from gptjax.inference import Engine, GenerationConfig
from gptjax.inference.server import CompletionServer, EngineLoop
from gptjax.model.sharded import ShardedModel
from gptjax.runs import RunDir
from gptjax.sharding.mesh import single_device_mesh
from gptjax.training.seed import seed_run

VOCAB, CONTEXT = 512, 96
PROMPTS = ["It is a truth universally acknowledged", "Emma Woodhouse, handsome,", "The family of Dashwood",
           "Sir Walter Elliot"]


@pytest.fixture(scope="module")
def tokenizer(small_corpus) -> Tokenizer:
    return Tokenizer.train(split_documents(read_corpus(small_corpus), None), VOCAB, sample_chars=300_000)


@pytest.fixture(scope="module")
def model_params():
    # untied, so that a random model's text varies (a tied one mostly repeats its last token)
    model = ShardedModel(nano_model(vocab_size=VOCAB, max_seq_len=CONTEXT, tie_embeddings=False),
                         single_device_mesh())
    return model, model.init_params(jax.random.key(0))


@pytest.fixture(scope="module")
def server(model_params, tokenizer):
    model, params = model_params
    srv = CompletionServer(Engine(model, params, tokenizer, slots=4), "tiny", port=0).start()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def reference(model_params, tokenizer):
    """What the engine alone gives, one prompt at a time."""
    model, params = model_params
    engine = Engine(model, params, tokenizer, slots=1)
    return lambda prompt, **kw: engine.generate([prompt], GenerationConfig(**kw))[0]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def post(server, body, path: str = "/v1/completions", raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_completion_is_the_engines(server, reference):
    out = client(server).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0.7,
                                            seed=3, logprobs=2)
    ref = reference(PROMPTS[0], max_new_tokens=12, temperature=0.7, seed=3)
    [choice] = out.choices
    assert choice.text == ref.text and choice.finish_reason == ref.finish_reason == "length"
    np.testing.assert_allclose(choice.logprobs.token_logprobs, ref.logprobs, atol=1e-5)
    assert len(choice.logprobs.tokens) == 12 and choice.logprobs.text_offset[0] == 0
    assert choice.logprobs.text_offset == sorted(choice.logprobs.text_offset)
    assert all(ref.text[o:].startswith(t) for o, t in zip(choice.logprobs.text_offset, choice.logprobs.tokens)
               if not t.startswith("bytes:"))  # each token's text is where its offset says
    assert all(len(t) == 2 for t in choice.logprobs.top_logprobs)
    # the sampled token's log-probability is at most the best alternative's
    assert all(lp <= max(t.values()) + 1e-6 for lp, t in zip(choice.logprobs.token_logprobs,
                                                             choice.logprobs.top_logprobs))
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == len(ref.prompt_ids)
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_streamed_chunks_join_to_the_completion(server):
    c = client(server)
    kw = dict(model="tiny", prompt=PROMPTS[:2], max_tokens=10, temperature=1.0, seed=11, n=2, logprobs=1)
    whole = c.completions.create(**kw)
    pieces, finish, lps = {}, {}, {}
    for chunk in c.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            pieces[ch.index] = pieces.get(ch.index, "") + ch.text
            lps.setdefault(ch.index, []).extend(ch.logprobs.token_logprobs if ch.logprobs else [])
            finish[ch.index] = ch.finish_reason or finish.get(ch.index)
    assert sorted(pieces) == [0, 1, 2, 3]  # choice = prompt index * n + sample index
    for ch in whole.choices:
        assert pieces[ch.index] == ch.text and finish[ch.index] == ch.finish_reason
        np.testing.assert_allclose(lps[ch.index], ch.logprobs.token_logprobs, atol=1e-5)
    assert whole.choices[0].text != whole.choices[1].text  # n samples are different draws (seed, seed + 1)


def test_echo_scores_the_prompt_with_the_models_log_probabilities(server, model_params, tokenizer):
    model, params = model_params
    status, out = post(server, {"prompt": PROMPTS[1], "max_tokens": 0, "echo": True, "logprobs": 0})
    assert status == 200, out
    [choice] = out["choices"]
    ids = tokenizer.encode(PROMPTS[1])
    assert choice["text"] == PROMPTS[1] and len(choice["logprobs"]["tokens"]) == len(ids)
    logp = np.asarray(jax.nn.log_softmax(model.forward(params, np.asarray([ids]))[0]))
    expected = [logp[i, ids[i + 1]] for i in range(len(ids) - 1)]
    assert choice["logprobs"]["token_logprobs"][0] is None  # the first token has no context
    np.testing.assert_allclose(choice["logprobs"]["token_logprobs"][1:], expected, atol=1e-4)
    assert choice["logprobs"]["text_offset"][0] == 0


BAD = [  # (body, status, the param the error names, words in its message)
    ({"prompt": "x", "temperature": -1}, 400, "temperature", "temperature must be >= 0"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p", "top_p must be in"),
    ({"prompt": "x", "top_k": -3}, 400, "top_k", "top_k"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens", "max_tokens must be int"),
    ({"prompt": ""}, 400, "prompt", "a prompt is empty"),
    ({"prompt": 7}, 400, "prompt", "prompt must be a string"),
    ({"prompt": list(range(CONTEXT + 5))}, 400, "prompt", str(CONTEXT)),
    ({"prompt": "x", "max_tokens": 10 * CONTEXT}, 400, "max_tokens", "more than the model's context"),
    ({"prompt": "x", "max_tokens": 10 * CONTEXT}, 400, "max_tokens", "; set max_tokens to at most"),
    ({"prompt": "x", "n": 17}, 400, "n", "n must be >= 1 and at most 16"),
    ({"prompt": ["x"] * 10, "n": 16, "max_tokens": 300}, 400, "max_tokens", "more than the 32,768 one request"),
    ({"prompt": "a \ud800 b"}, 400, "prompt", "lone surrogate"),
    ({"prompt": "x", "stop": ["\udfff"]}, 400, "prompt", "lone surrogate"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
    ({"prompt": "x", "logprobs": 9}, 400, "logprobs", "logprobs must be an integer in [0, 5]"),
    ({"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ({"prompt": "x", "n": 0}, 400, "n", "n must be >= 1"),
    ({"prompt": "x", "stop": 3}, 400, "stop", "stop must be a string"),
    ({"prompt": "x", "temprature": 0}, 400, "temprature", "unknown parameter(s) temprature"),
    (["x"], 400, None, "must be a JSON object"),
]


@pytest.mark.parametrize("body,status,param,words", BAD, ids=[str(b[2]) + "-" + b[3][:12] for b in BAD])
def test_a_bad_request_gets_a_4xx_json_error_naming_the_parameter(server, body, status, param, words):
    got, out = post(server, body)
    assert got == status, out
    error = out["error"]
    assert words in error["message"] and error["param"] == param, error
    assert error["type"] == "invalid_request_error"


def test_malformed_http_and_endpoints_get_json_errors_and_the_server_goes_on(server, reference):
    got, out = post(server, None, raw=b"{not json")
    assert got == 400 and "not valid JSON" in out["error"]["message"]
    got, out = post(server, None, raw=b"[" * 100_000 + b"]" * 100_000)  # a 500 before
    assert got == 400 and "nested too deeply" in out["error"]["message"]
    got, out = post(server, {"prompt": "x"}, path="/v1/chat/completions")
    assert got == 404 and "/v1/completions" in out["error"]["message"]
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.putrequest("POST", "/v1/completions")  # no Content-Length
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 411 and "Content-Length" in json.loads(r.read())["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="temperature must be >= 0"):
        client(server).completions.create(model="tiny", prompt="x", temperature=-1)
    with urllib.request.urlopen(server.url + "/health", timeout=60) as r:
        assert json.loads(r.read()) == {"status": "ok"}
    # seeded: an unseeded draw may sample the end of sequence and answer fewer tokens (seen in CI: 2 of 3)
    got, out = post(server, {"prompt": "still", "max_tokens": 3, "temperature": 0.7, "seed": 5})
    ref = reference("still", max_new_tokens=3, temperature=0.7, seed=5)
    assert got == 200 and out["choices"][0]["text"] == ref.text
    assert out["usage"]["completion_tokens"] == len(ref.token_ids) > 0


def test_many_concurrent_requests_are_all_answered_as_if_alone(server, reference):
    """24 clients at once on 4 slots (streamed and not, different lengths and settings): every one is answered,
    with what the engine gives that request alone."""
    jobs = [dict(prompt=PROMPTS[i % 4] + " " * (i % 3 == 0), max_tokens=4 + i % 7, temperature=[0.0, 0.8, 1.2][i % 3],
                 top_k=[0, 20][i % 2], seed=100 + i, stream=i % 4 == 1) for i in range(24)]

    def ask(job):
        c, job = client(server), dict(job)
        extra = {"top_k": job.pop("top_k")}  # an extension: the openai client passes it in the body as it is
        if job["stream"]:
            return "".join(ch.choices[0].text for ch in c.completions.create(model="tiny", extra_body=extra, **job))
        return c.completions.create(model="tiny", extra_body=extra, **job).choices[0].text

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(ask, jobs))
    for job, text in zip(jobs, answers):
        ref = reference(job["prompt"], max_new_tokens=job["max_tokens"], temperature=job["temperature"],
                        top_k=job["top_k"], seed=job["seed"])
        assert text == ref.text, job


def test_a_client_that_goes_away_frees_its_slot(server, monkeypatch):
    engine, submitted = server.loop.engine, []
    monkeypatch.setattr(server.loop, "submit", lambda r: submitted.append(r) or EngineLoop.submit(server.loop, r))
    body = json.dumps({"prompt": PROMPTS[2], "max_tokens": CONTEXT - 20, "stream": True}).encode()
    with socket.create_connection((server.host, server.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        reply = sock.makefile("rb")
        assert reply.readline().startswith(b"HTTP/1.1 200")
        while not reply.readline().startswith(b"data: "):  # headers, then the first event
            pass
        assert engine.busy
        reply.close()
    deadline = time.monotonic() + 60
    while engine.busy and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.busy
    [request] = submitted
    assert request.completion.finish_reason == "cancelled"  # no slot decodes for nobody
    assert len(request.completion.token_ids) < CONTEXT - 20


def test_clients_that_give_up_on_a_non_streaming_request_free_its_slots(server, monkeypatch):
    """Non-streaming clients that gave up (closed the connection) kept their choices decoding: the next request
    waited for all of them. Now each request sees its client go and is cancelled."""
    engine, submitted = server.loop.engine, []
    monkeypatch.setattr(server.loop, "submit", lambda r: submitted.append(r) or EngineLoop.submit(server.loop, r))
    step = engine.step

    def slow_step():  # 20 ms a token: no choice can finish before the clients leave (an idle CI machine decoded
        time.sleep(0.02)  # the first request's 76 tokens before all three requests were in, and it ended 'length')
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    body = json.dumps({"prompt": PROMPTS[1], "max_tokens": CONTEXT - 20, "n": 4, "temperature": 1.0}).encode()
    socks = [socket.create_connection((server.host, server.port), timeout=60) for _ in range(3)]
    for sock in socks:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + 60
    while not (engine.busy and len(submitted) == 12) and time.monotonic() < deadline:
        time.sleep(0.01)
    for sock in socks:
        sock.close()
    while engine.busy and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.busy and len(submitted) == 12
    assert all(r.completion.finish_reason == "cancelled" for r in submitted[:4]), \
        [r.completion.finish_reason for r in submitted]
    assert sum(len(r.completion.token_ids) for r in submitted) < 12 * (CONTEXT - 20)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer, model_params):
    model, params = model_params
    cfg = RunConfig(model=model.cfg, train=TrainConfig(run_dir=str(tmp_path_factory.mktemp("serve") / "run"),
                                                       seq_len=64, batch_size=4, progress=False))
    seed_run(cfg, jax.device_get(params), tokenizer.proto, {"test": "serve"})
    return cfg.train.run_dir


def test_the_console_script_serves_a_run_and_stops_on_sigterm(run_dir, reference):
    proc = subprocess.Popen([sys.executable, "-m", "gptjax.cli.serve", "--run-dir", run_dir, "--port", "0",
                             "--slots", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ONE_DEVICE_ENV)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving run (") and "with 2 slots" in line, (line, proc.stderr.read()
                                                                             if proc.poll() is not None else "")
        url = line.split(" on ", 1)[1].split(" with ")[0]
        c = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        out = c.completions.create(model="run", prompt=PROMPTS[3], max_tokens=6, temperature=0)
        assert out.choices[0].text == reference(PROMPTS[3], max_new_tokens=6, temperature=0).text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_console_scripts_refuse_bad_input_in_one_line(tmp_path, run_dir, small_corpus):
    r = run_cli("serve", "--run-dir", str(tmp_path), env=ONE_DEVICE_ENV)
    assert r.returncode == 2 and "gptjax run directory" in r.stderr and "Traceback" not in r.stderr, r.stderr
    draft = tmp_path / "draft"  # the same run but another tokenizer: not a draft for it
    shutil.copytree(run_dir, draft)
    other = Tokenizer.train(split_documents(read_corpus(small_corpus), None), VOCAB, sample_chars=100_000)
    RunDir(draft).tokenizer.write_bytes(other.proto)
    r = run_cli("sample", "--run-dir", run_dir, "--draft-run-dir", str(draft), "--prompt", "x", env=ONE_DEVICE_ENV)
    assert r.returncode == 2 and "speculative decoding needs the same tokenizer" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
