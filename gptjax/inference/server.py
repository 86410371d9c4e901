"""An OpenAI-compatible completions server over the generation engine: ``POST /v1/completions`` (streamed as
server-sent events or not, with ``logprobs`` and ``echo``), ``GET /v1/models``, ``GET /health``.

One thread runs the engine (continuous batching: every request waiting for a slot is prefilled into the first
free one while the others keep decoding); the HTTP server (the standard library's, a thread per connection) turns
each request into engine requests and waits for them, or streams their text as it is produced. A bad request gets
a 4xx with OpenAI's error body (``{"error": {"message", "type", "param", "code"}}``) naming the field; an
unexpected failure a 500 with the same body; the server goes on either way. A streaming client that goes away
frees its slot at the next step.

Parameters: ``prompt`` (a string, a list of strings, a list of token ids or a list of such lists), ``max_tokens``
(default 16), ``temperature`` (default 1; 0 is greedy), ``top_p``, ``n`` (samples per prompt, seeds ``seed``,
``seed + 1``, ...; without a seed each request draws afresh), ``stream``, ``logprobs`` (0-5 alternatives),
``echo``, ``stop``, ``seed``, and the common extensions ``top_k`` and ``repetition_penalty``; ``model`` must name
the served model when given. Parameters this server does not implement (``presence_penalty``, ``logit_bias``,
``suffix``, ...) are refused when set to anything but their neutral value, never ignored.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import select
import socket
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from gptjax.inference.engine import ContextOverflow, Engine, Request
from gptjax.inference.sampling import TOP_LOGPROBS, GenerationConfig, GenerationError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 20
# A request's size: eight non-streaming clients that gave up on n=32 x 250 tokens kept the engine busy, and the next
# 4-token request waited 16.8 s. Abandoned requests are now cancelled; these bound what one request may ask for.
MAX_N = 16  # choices per prompt
MAX_REQUEST_TOKENS = 32_768  # prompts x n x max_tokens
DISCONNECT_POLL_S = 0.2  # how often a non-streaming request checks that its client is still there
# parameters accepted but with no effect here (OpenAI's bookkeeping fields)
IGNORED = {"user", "stream_options"}
# parameters not implemented: accepted only at their neutral value
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "suffix": None, "best_of": None}
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "logprobs", "echo", "stop",
         "seed", "repetition_penalty"} | IGNORED | set(NEUTRAL)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # the standard library listens with a backlog of 5: a burst of clients connecting at once was reset
    # (24 concurrent clients, tests/test_serve.py); a connection waits in the backlog until its thread is started
    request_queue_size = 1024


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


class EngineLoop:
    """The engine, stepped by one thread whenever it has work; requests come from any thread."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="gptjax-engine", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> Request:
        self.engine.submit(request)
        self.wake.set()
        return request

    def _run(self) -> None:
        while not self.stopping.is_set():
            if not self.engine.busy:
                self.wake.wait(0.1)
                self.wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as e:  # noqa: BLE001 - a failed step ends its requests with the error; serving goes on
                log.error("generation step failed: %s", "".join(traceback.format_exception_only(e)).strip())
                self.engine.abort(f"generation failed: {type(e).__name__}: {e}")

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout=30)


class CompletionServer:
    """``CompletionServer(engine, "austen").serve_forever()`` on ``host:port`` (port 0: any free port, see
    ``.port``). ``start()`` serves from a background thread (tests, notebooks); ``close()`` stops both threads."""

    def __init__(self, engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000):
        self.loop = EngineLoop(engine)
        self.model_name = model_name
        self.created = int(time.time())
        self.httpd = _HTTPServer((host, port), _handler(self))
        self.host, self.port = self.httpd.server_address[:2]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self) -> "CompletionServer":
        self._thread = threading.Thread(target=self.serve_forever, name="gptjax-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.loop.stop()

    # ---- the API --------------------------------------------------------------------------------------------
    def models(self) -> dict:
        engine = self.loop.engine
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "gptjax", "max_model_len": engine.max_len}]}

    def parse(self, body: dict) -> tuple[list, GenerationConfig, dict]:
        """``(prompts, config, options)`` of a completions request, or ``BadRequest`` naming the field."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        unknown = sorted(set(body) - KNOWN)
        if unknown:
            raise BadRequest(f"unknown parameter(s) {', '.join(unknown)}; this server accepts "
                             f"{', '.join(sorted(KNOWN))}", unknown[0])
        for name, neutral in NEUTRAL.items():
            if body.get(name, neutral) not in (neutral, None):
                raise BadRequest(f"{name} is not supported by this server (leave it out or at {neutral!r})", name)
        if body.get("model") not in (None, self.model_name):
            raise BadRequest(f"the model {body['model']!r} does not exist; this server serves {self.model_name!r}",
                             "model", 404, "model_not_found")
        prompts = _prompts(body.get("prompt"))

        def get(name: str, kind, default):
            value = body.get(name, default)
            if value is None:
                value = default
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise BadRequest(f"{name} must be {kind.__name__ if kind is not str else 'a string'}, got "
                                 f"{json.dumps(value)}", name)
            return value

        n = get("n", int, 1)
        if not 1 <= n <= MAX_N:
            raise BadRequest(f"n must be >= 1 and at most {MAX_N}, got {n}", "n")
        logprobs = body.get("logprobs")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= TOP_LOGPROBS):
            raise BadRequest(f"logprobs must be an integer in [0, {TOP_LOGPROBS}] (alternatives per token) or null, "
                             f"got {json.dumps(logprobs)}", "logprobs")
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise BadRequest(f"stop must be a string or a list of strings, got {json.dumps(body.get('stop'))}", "stop")
        try:
            config = GenerationConfig(max_new_tokens=get("max_tokens", int, 16),
                                      temperature=get("temperature", float, 1.0), top_p=get("top_p", float, 1.0),
                                      top_k=get("top_k", int, 0),
                                      seed=get("seed", int, secrets.randbits(32)),  # none given: fresh draws
                                      repetition_penalty=get("repetition_penalty", float, 1.0), stop=tuple(stop))
        except GenerationError as e:
            raise BadRequest(str(e), _param_of(str(e))) from None
        total = len(prompts) * n * config.max_new_tokens
        if total > MAX_REQUEST_TOKENS:
            raise BadRequest(f"{len(prompts)} prompt(s) x n={n} x max_tokens={config.max_new_tokens} = {total:,} "
                             f"tokens, more than the {MAX_REQUEST_TOKENS:,} one request may ask for: lower max_tokens "
                             "or n, or send several requests", "max_tokens")
        if any(_not_unicode(t) for t in [*prompts, *stop] if isinstance(t, str)):
            raise BadRequest("the prompt or stop holds a lone surrogate (e.g. \\ud800): not valid Unicode text; "
                             "send UTF-8 text or token ids", "prompt")
        options = dict(n=n, stream=get("stream", bool, False), logprobs=logprobs, echo=get("echo", bool, False))
        return prompts, config, options

    def requests(self, prompts: list, config: GenerationConfig, options: dict, on_text=None, on_finish=None):
        """The engine requests of a completions request, ``choice = prompt index * n + sample index``."""
        out = []
        for p in prompts:
            for i in range(options["n"]):
                index = len(out)
                try:
                    out.append(self.loop.engine.request(
                        p, config.replace(seed=config.seed + i),
                        on_text=None if on_text is None else (lambda piece, k=index: on_text(k, piece)),
                        on_finish=None if on_finish is None else (lambda r, k=index: on_finish(k, r)),
                        prompt_logprobs=options["echo"] and options["logprobs"] is not None))
                except ContextOverflow as e:  # (named the prompt even where max_tokens was the field to change)
                    raise BadRequest(f"{e}; set max_tokens to at most {e.room}" if e.room > 0 else str(e),
                                     "max_tokens" if e.room > 0 else "prompt") from None
                except GenerationError as e:
                    raise BadRequest(str(e), "prompt" if "prompt" in str(e) else _param_of(str(e))) from None
        return out

    def choice(self, request: Request, index: int, options: dict) -> dict:
        c = request.completion
        prompt_text = self.prompt_text(request) if options["echo"] else ""
        logprobs = None
        if options["logprobs"] is not None:
            logprobs = self.logprobs(request, options, 0, len(c.token_ids), len(prompt_text))
            if options["echo"]:
                logprobs = _joined(self.prompt_logprobs(request, options), logprobs)
        return {"text": prompt_text + (c.text or ""), "index": index, "finish_reason": c.finish_reason,
                "logprobs": logprobs}

    def logprobs(self, request: Request, options: dict, first: int, last: int, offset: int) -> dict:
        """OpenAI's logprobs object for completion tokens ``first:last``; ``offset``: where the completion's text
        starts in the choice's text."""
        c, engine = request.completion, self.loop.engine
        text_of = (lambda n: engine.text_after(c.prompt_ids, c.token_ids[:n])) if engine.tokenizer else None
        return self._logprobs(c.token_ids, c.logprobs, c.top_logprobs, first, last, options["logprobs"], offset,
                              text_of)

    def prompt_logprobs(self, request: Request, options: dict) -> dict:
        """The prompt's tokens as a logprobs object (echo): the first has no log-probability (no context)."""
        c, tok = request.completion, self.loop.engine.tokenizer
        text_of = (lambda n: tok.decode(c.prompt_ids[:n])) if tok else None
        return self._logprobs(c.prompt_ids, c.prompt_logprobs, c.prompt_top_logprobs, 0, len(c.prompt_ids),
                              options["logprobs"], 0, text_of)

    def _logprobs(self, ids: list[int], lps: list, tops: list, first: int, last: int, k: int, offset: int,
                  text_of) -> dict:
        """Tokens ``first:last`` of ``ids``: their strings (a byte token as ``bytes:\\xNN``, as vLLM writes it),
        log-probabilities, ``k`` best alternatives and where each starts in the text (``offset`` plus the length
        of ``text_of(i)``, the text of the first ``i`` tokens; by token string lengths without a tokenizer)."""
        tok = self.loop.engine.tokenizer
        names = tok.token_text if hasattr(tok, "token_text") else (lambda xs: [str(x) for x in xs])
        strings = names(ids[first:last])
        if text_of is not None:
            offsets = [offset + len(text_of(i)) for i in range(first, last)]
        else:
            offsets = list(offset + np.cumsum([0] + [len(s) for s in strings[:-1]])) if strings else []
        top = [None if t is None else dict(zip(names(list(t)[:k]), list(t.values())[:k])) for t in tops[first:last]]
        return {"tokens": strings, "token_logprobs": list(lps[first:last]), "top_logprobs": top,
                "text_offset": [int(o) for o in offsets]}

    def prompt_text(self, request: Request) -> str:
        tok = self.loop.engine.tokenizer
        return tok.decode(request.prompt_ids) if tok is not None else ""

    def completion_body(self, requests: list[Request], options: dict, cid: str) -> dict:
        errors = [r.completion.error for r in requests if r.completion.error]
        if errors:
            raise RuntimeError(errors[0])
        prompt_tokens = sum(len(r.prompt_ids) for r in requests[::options["n"]])
        completion_tokens = sum(len(r.completion.token_ids) for r in requests)
        return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": self.model_name,
                "choices": [self.choice(r, i, options) for i, r in enumerate(requests)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}


def _joined(a: dict, b: dict) -> dict:
    return {key: a[key] + b[key] for key in a}


def _prompts(prompt: Any) -> list:
    """The prompts of a request: each a string or a list of token ids."""
    is_ids = lambda x: isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)  # noqa
    if isinstance(prompt, str):
        prompts = [prompt]
    elif is_ids(prompt) and prompt:
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise BadRequest("prompt must be a string, a list of strings, a list of token ids or a list of such lists, "
                         f"got {json.dumps(prompt)[:80]}", "prompt")
    if any(len(p) == 0 for p in prompts):
        raise BadRequest("a prompt is empty; give at least one token", "prompt")
    return prompts


def _not_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _param_of(message: str) -> str | None:
    """The request parameter a ``GenerationConfig`` error is about."""
    field = message.split(" ", 1)[0]
    return {"max_new_tokens": "max_tokens", "stop": "stop"}.get(field, field)


def _handler(server: CompletionServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "gptjax"

        def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
            log.debug("%s %s", self.address_string(), format % args)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/v1/models":
                self._json(200, server.models())
            elif path == "/health":
                self._json(200, {"status": "ok"})
            else:
                self._error(BadRequest(f"no such endpoint: GET {self.path}; try /v1/models or POST /v1/completions",
                                       status=404, code="not_found"))

        def do_POST(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0].rstrip("/")
            try:
                if path != "/v1/completions":
                    raise BadRequest(f"no such endpoint: POST {self.path}; this server has /v1/completions",
                                     status=404, code="not_found")
                self._completions(self._body())
            except BadRequest as e:
                self._error(e)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away
            except Exception as e:  # noqa: BLE001 - one failing request never takes the server down
                log.error("request failed: %s", "".join(traceback.format_exception(e)))
                self._error(BadRequest(f"internal error: {type(e).__name__}: {e}", status=500, code="internal_error"))

        def _body(self) -> Any:
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise BadRequest("the request needs a Content-Length header", status=411)
            if int(length) > MAX_BODY_BYTES:
                raise BadRequest(f"the request body has {length} bytes, more than {MAX_BODY_BYTES}", status=413)
            raw = self.rfile.read(int(length))
            try:
                return json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(f"the request body is not valid JSON: {e}") from None
            except RecursionError:  # 100,000 nested arrays: a 500 before
                raise BadRequest("the request body is nested too deeply") from None

        def _completions(self, body: Any) -> None:
            prompts, config, options = server.parse(body)
            cid = f"cmpl-{uuid.uuid4().hex[:24]}"
            if not options["stream"]:
                requests = server.requests(prompts, config, options)
                for r in requests:
                    server.loop.submit(r)
                for r in requests:
                    while not r.done.wait(DISCONNECT_POLL_S):
                        if self._client_gone():  # it gave up: its slots decode for nobody
                            for other in requests:
                                other.cancelled = True
                            server.loop.wake.set()
                            self.close_connection = True
                            return
                self._json(200, server.completion_body(requests, options, cid))
                return
            events: queue.Queue = queue.Queue()  # (choice, text piece or None at the end, tokens so far)
            requests = server.requests(
                prompts, config, options,
                on_text=lambda k, piece: events.put((k, piece, len(requests[k].completion.token_ids))),
                on_finish=lambda k, r: events.put((k, None, len(r.completion.token_ids))))
            sent = [0] * len(requests)  # completion tokens already reported, per choice
            echoed = [not options["echo"]] * len(requests)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            for r in requests:
                server.loop.submit(r)
            try:
                left = len(requests)
                while left:
                    k, piece, count = events.get()
                    r = requests[k]
                    if piece is None and r.completion.error:
                        left -= 1
                        self._sse({"error": {"message": r.completion.error, "type": "server_error", "param": None,
                                             "code": "internal_error"}})
                        continue
                    if not echoed[k]:  # the prompt first (prefilled by now: its log-probabilities are known)
                        echoed[k] = True
                        self._chunk(cid, {"text": server.prompt_text(r), "index": k, "finish_reason": None,
                                          "logprobs": server.prompt_logprobs(r, options)
                                          if options["logprobs"] is not None else None})
                    lp = (server.logprobs(r, options, sent[k], count,
                                          len(server.prompt_text(r)) if options["echo"] else 0)
                          if options["logprobs"] is not None else None)
                    sent[k] = count
                    self._chunk(cid, {"text": piece or "", "index": k, "logprobs": lp,
                                      "finish_reason": None if piece is not None else r.completion.finish_reason})
                    left -= piece is None
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                for r in requests:
                    r.cancelled = True
                server.loop.wake.set()

        def _client_gone(self) -> bool:
            """The client closed its connection (readable, and a peek reads the end of the stream)."""
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
            except (OSError, ValueError):
                return True

        def _chunk(self, cid: str, choice: dict) -> None:
            self._sse({"id": cid, "object": "text_completion", "created": int(time.time()),
                       "model": server.model_name, "choices": [choice]})

        def _sse(self, obj: dict) -> None:
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        def _json(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, e: BadRequest) -> None:
            kind = "invalid_request_error" if e.status < 500 else "server_error"
            try:
                self._json(e.status, {"error": {"message": str(e), "type": kind, "param": e.param, "code": e.code}})
            except (BrokenPipeError, ConnectionResetError):
                pass

    return Handler
