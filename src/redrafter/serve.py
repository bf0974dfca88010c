"""``redrafter serve``: an OpenAI-compatible HTTP server over one continuous-batching decode loop.

One decode loop (:class:`Engine`, on the main thread under ``redrafter serve``; uvicorn's event loop
runs on another) owns a :class:`~redrafter.decode.RunningBatch`. Between target forwards it takes
waiting requests (prefilled, then joining the batch), drops cancelled ones (a client that went
away), and runs one step for every running row; each row's new tokens go to its request's queue on
the event loop, which detokenizes, cuts ``stop`` strings and streams them. Each row keeps its own
sampling settings and random stream (:class:`~redrafter.sampling.RowChooser`).

Speculation adapts to load: each step verifies the tree, a small tree or is a plain one-token step,
as :class:`~redrafter.step_policy.SpeculationPolicy` chooses from the tokens per second it measured
for each kind of step at the current batch size (or a fixed threshold, ``speculate_max_batch``:
the tree or plain steps).
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .api import ReDrafter
from .decode import RunningBatch
from .errors import RedrafterError
from .sampling import RowChooser, SamplingParams
from .step_policy import SpeculationPolicy

UNSUPPORTED = ("tools", "functions", "tool_choice", "response_format", "logit_bias", "audio", "modalities")


class ApiError(Exception):
    """An OpenAI-style error: HTTP ``status``, ``message``, ``type``, ``param``, ``code``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            status, "server_error"
        )

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


@dataclass
class Job:
    """One request inside the engine: its prompt, budget and sampling, and where its tokens go."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    row: int | None = None
    cancelled: bool = False
    forwards: int = 0  # target forwards this row took part in (its prefill included)

    def deliver(self, tokens: list[int], finished: bool) -> None:
        """Called on the worker thread: hand ``tokens`` to the request's event loop."""
        self.forwards += 1
        self.loop.call_soon_threadsafe(self.events.put_nowait, (tokens, finished))


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("redrafter_requests", "Requests received, by outcome", ["outcome"], registry=r)
        self.tokens = Counter("redrafter_generated_tokens", "Tokens generated", registry=r)
        self.forwards = Counter("redrafter_target_forwards", "Target forwards (steps and prefills)", registry=r)
        self.row_forwards = Counter("redrafter_row_forwards", "Row-steps: each row's part in a forward", registry=r)
        self.cancelled = Counter(
            "redrafter_cancelled_rows",
            "Rows dropped before their end: the client went away, or a stop string matched",
            registry=r,
        )
        self.batch_size = Gauge("redrafter_batch_size", "Rows running", registry=r)
        self.queue_length = Gauge("redrafter_queue_length", "Requests waiting to join", registry=r)
        self.speculating = Gauge(
            "redrafter_speculating", "the last step's kind: 0 plain, 1 the tree, 2 the small tree", registry=r
        )
        self.tokens_per_forward = Gauge(
            "redrafter_tokens_per_forward", "Tokens emitted per row-step, over the server's life", registry=r
        )
        self.step_seconds = Histogram("redrafter_step_seconds", "Seconds per decode step", registry=r)


class Engine:
    """The decode loop serving every request (continuous batching).

    :meth:`run` is the loop; ``redrafter serve`` runs it on the main thread (a worker thread's
    PyTorch CPU kernels measured 25-30% slower here) with uvicorn on another; :meth:`start` runs it
    on a thread of its own instead (tests).

    Args:
        rd: the loaded target and drafter.
        max_batch: rows decoding at once; more wait in the queue.
        max_queue: requests waiting beyond that; more are refused (HTTP 429).
        speculate_max_batch: None: choose per step from measured throughput
            (:class:`~redrafter.step_policy.SpeculationPolicy`); a number: speculate while at most
            that many rows run, plain steps above (0: never speculate).
    """

    def __init__(
        self, rd: ReDrafter, max_batch: int = 16, max_queue: int = 64, speculate_max_batch: int | None = None
    ) -> None:
        self.rd, self.max_batch, self.max_queue = rd, max_batch, max_queue
        adaptive = speculate_max_batch is None and rd.drafter is not None
        self.policy = SpeculationPolicy(
            prior=2 if speculate_max_batch is None else speculate_max_batch,
            adaptive=adaptive,
            kinds=rd.decoder.kinds if adaptive else ("plain", "tree"),
            lone_tree=rd.lone_tree,
        )
        self.chooser = RowChooser(rd.target, rd.decoder.argmax_head, rd.decoder.head)
        self.batch = RunningBatch(rd.decoder, self.chooser)
        self.metrics = Metrics()
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.jobs: dict[int, Job] = {}  # row id -> job
        self.wake = threading.Event()
        self.closing = False
        self.thread: threading.Thread | None = None
        self.emitted = self.row_steps = 0
        self.kind_steps = [0] * len(self.policy.kinds)  # decode steps of each kind (policy.kinds)

    def start(self) -> None:
        """Run the loop on a thread of its own until :meth:`close`."""
        self.thread = threading.Thread(target=self.run, name="redrafter-decode", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop taking requests (503); the loop finishes the running and waiting rows, then returns."""
        self.closing = True
        self.wake.set()
        if self.thread is not None:
            self.thread.join()

    def submit(self, job: Job) -> None:
        if self.closing:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        if self.waiting.qsize() >= self.max_queue:
            self.metrics.requests.labels("refused").inc()
            raise ApiError(
                429, f"the queue is full ({self.max_queue} requests waiting); retry later", code="queue_full"
            )
        self.waiting.put(job)
        self.metrics.queue_length.set(self.waiting.qsize())
        self.wake.set()

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Serve until :meth:`close` (or, when idle, until ``until()`` is true), then return."""
        while True:
            self._drop_cancelled()
            self._admit()
            if not self.batch.size:
                if (self.closing or (until is not None and until())) and self.waiting.empty():
                    return
                self.wake.wait(timeout=0.05)
                self.wake.clear()
                continue
            rows = self.batch.ids
            kind = self.policy.choose(rows, all(self.jobs[row].sampling.greedy for row in rows))
            self.kind_steps[kind] += 1
            self.metrics.speculating.set(kind)
            start = time.perf_counter()
            try:
                out = self.batch.step(kind)
            except Exception as error:  # a failed step fails its rows, not the server
                for row in list(self.jobs):
                    job = self.jobs[row]
                    self.batch.cancel(row)
                    self._finish(row)
                    job.loop.call_soon_threadsafe(job.events.put_nowait, error)
                continue
            seconds = time.perf_counter() - start
            self.policy.record(out.rows, kind, [len(tokens) for tokens in out.tokens], seconds, out.nested)
            self._deliver(out)
            self.metrics.step_seconds.observe(seconds)

    def _admit(self) -> None:
        """Prefill waiting jobs (up to ``max_batch`` rows in all) and let them join."""
        joining: list[Job] = []
        while self.batch.size + len(joining) < self.max_batch and not self.waiting.empty():
            job = self.waiting.get()
            if not job.cancelled:
                joining.append(job)
        self.metrics.queue_length.set(self.waiting.qsize())
        if not joining:
            return
        for offset, job in enumerate(joining):
            job.row = self.batch.next_id + offset
            self.jobs[job.row] = job
            self.chooser.add(job.row, job.sampling)
        try:
            out = self.batch.add([j.prompt for j in joining], [j.max_tokens for j in joining])
        except Exception as error:  # the prefill failed (memory, say): these requests fail, the server goes on
            for job in joining:
                self._finish(job.row)
                job.loop.call_soon_threadsafe(job.events.put_nowait, error)
            return
        self._deliver(out)

    def _deliver(self, out) -> None:
        self.metrics.forwards.inc()
        for row, tokens, finished in zip(out.rows, out.tokens, out.finished, strict=True):
            self.emitted += len(tokens)
            self.row_steps += 1
            self.metrics.tokens.inc(len(tokens))
            self.jobs[row].deliver(tokens, finished)
            if finished:
                self._finish(row)
        self.metrics.row_forwards.inc(len(out.rows))
        self.metrics.tokens_per_forward.set(self.emitted / max(self.row_steps, 1))
        self.metrics.batch_size.set(self.batch.size)

    def _drop_cancelled(self) -> None:
        for row in [r for r, job in self.jobs.items() if job.cancelled]:
            self.batch.cancel(row)
            self.metrics.cancelled.inc()
            self._finish(row)
        self.metrics.batch_size.set(self.batch.size)

    def _finish(self, row: int) -> None:
        self.jobs.pop(row, None)
        self.chooser.remove(row)
        self.policy.forget(row)


@dataclass
class Completion:
    """A parsed request: token ids and generation settings."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool


def _field(body: dict, name: str, kinds: type | tuple[type, ...], default=None):
    """``body[name]`` if it has one of ``kinds`` (a bool is no number here), ``default`` if absent or null."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ApiError(400, f"'{name}' has the wrong type: {type(value).__name__}", param=name, code="invalid_type")
    return value


def parse_request(rd: ReDrafter, body: object, chat: bool, model_name: str) -> Completion:
    """Check an OpenAI request body and turn it into a :class:`Completion` (or raise :class:`ApiError`)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    model = _field(body, "model", str)
    if model is None:
        raise ApiError(400, "'model' is required", param="model", code="missing_field")
    if model not in (model_name, "default"):
        raise ApiError(
            404, f"the model '{model}' does not exist; this server serves '{model_name}'", "model", "model_not_found"
        )
    for name in UNSUPPORTED:
        if body.get(name) is not None:
            raise ApiError(400, f"'{name}' is not supported", param=name, code="unsupported_field")
    if _field(body, "n", int, 1) != 1:
        raise ApiError(400, "only n = 1 is supported", param="n", code="unsupported_value")
    if _field(body, "logprobs", (bool, int), False):
        raise ApiError(400, "logprobs are not supported", param="logprobs", code="unsupported_value")
    if chat:
        messages = _field(body, "messages", list)
        if not messages:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages", code="missing_field")
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
                raise ApiError(400, "each message needs a 'role' and a string 'content'", param="messages")
        if not getattr(rd.tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template: use /v1/completions", param="messages")
        text = rd.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = rd.tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        text = _field(body, "prompt", str)
        if not text:
            raise ApiError(400, "'prompt' must be a non-empty string", param="prompt", code="missing_field")
        prompt = rd.tokenizer(text)["input_ids"]
    max_tokens = _field(body, "max_completion_tokens", int) or _field(body, "max_tokens", int, 256)
    if max_tokens < 1:
        raise ApiError(400, "'max_tokens' must be at least 1", param="max_tokens", code="invalid_value")
    try:
        rd.check_context(prompt)
    except RedrafterError as error:
        raise ApiError(400, str(error), "messages" if chat else "prompt", "context_length_exceeded") from None
    try:
        sampling = SamplingParams(
            temperature=float(_field(body, "temperature", (int, float), 1.0)),
            top_p=float(_field(body, "top_p", (int, float), 1.0)),
            top_k=_field(body, "top_k", int, 0),
            seed=_field(body, "seed", int),
        )
    except RedrafterError as error:
        raise ApiError(400, str(error), code="invalid_value") from None
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or up to 4 non-empty strings", param="stop")
    options = _field(body, "stream_options", dict, {})
    return Completion(
        prompt,
        max_tokens,
        sampling,
        stop,
        bool(_field(body, "stream", bool, False)),
        bool(options.get("include_usage")),
    )


class TextStream:
    """Detokenizes a row's tokens as they come, holding back what could still become a ``stop`` string."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.sent = 0  # characters of the text already handed out
        self.stopped = False

    def push(self, tokens: list[int], last: bool) -> str:
        """The new text after ``tokens`` (all of what is left when ``last``); sets :attr:`stopped`."""
        self.tokens += tokens
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            text, last = text[:cut], True
        end = len(text)
        if not last:
            if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
                end = len(text.rstrip("\ufffd"))
            hold = max((len(s) - 1 for s in self.stop), default=0)
            end = min(end, max(self.sent, len(text) - hold))
        piece, self.sent = text[self.sent : end], max(self.sent, end)
        return piece


def build_app(engine: Engine, model_name: str, run_engine: bool = True) -> FastAPI:
    """The FastAPI application around ``engine``; with ``run_engine`` it starts the engine's loop on a
    thread and closes it at shutdown, else the caller runs :meth:`Engine.run`."""
    rd = engine.rd

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if run_engine:
            engine.start()
        yield
        if run_engine:
            await asyncio.to_thread(engine.close)  # running rows finish first

    app = FastAPI(title="redrafter", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "shutting down" if engine.closing else "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "redrafter"}],
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def complete(request: Request, chat: bool) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the body is not valid JSON: {error}", code="invalid_json") from None
        parsed = parse_request(rd, body, chat, model_name)
        job = Job(parsed.prompt, parsed.max_tokens, parsed.sampling, asyncio.get_running_loop())
        engine.submit(job)
        engine.metrics.requests.labels("accepted").inc()
        created, name = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        kind = "chat.completion" if chat else "text_completion"
        text = TextStream(rd.tokenizer, parsed.stop)

        def usage() -> dict:
            done = len(text.tokens)
            steps = max(job.forwards, 1)
            return {
                "prompt_tokens": len(parsed.prompt),
                "completion_tokens": done,
                "total_tokens": len(parsed.prompt) + done,
                "redrafter": {"target_forwards": job.forwards, "tokens_per_forward": round(done / steps, 3)},
            }

        async def pieces() -> AsyncIterator[tuple[str, str | None]]:
            """(new text, finish reason or None) until the row finishes."""
            try:
                while True:
                    event = await job.events.get()
                    if isinstance(event, Exception):
                        raise ApiError(500, f"generation failed: {event}")
                    tokens, finished = event
                    piece = text.push(tokens, finished)
                    if text.stopped:
                        job.cancelled = True
                        yield piece, "stop"
                        return
                    if finished:
                        eos = bool(text.tokens) and text.tokens[-1] in rd.decoder.eos_token_ids
                        yield piece, "stop" if eos else "length"
                        return
                    if piece:
                        yield piece, None
            finally:  # the client went away, or the row ended: free it at the next step
                job.cancelled = True
                engine.wake.set()

        def choice(piece: str, reason: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": piece, "finish_reason": reason, "logprobs": None}
            if delta:
                return {"index": 0, "delta": {"content": piece} if piece else {}, "finish_reason": reason}
            return {"index": 0, "message": {"role": "assistant", "content": piece}, "finish_reason": reason}

        if not parsed.stream:
            parts, reason = [], None
            async for piece, reason in pieces():  # noqa: B007 (the last reason is the one reported)
                parts.append(piece)
            body = {"id": name, "object": kind, "created": created, "model": model_name}
            return JSONResponse(body | {"choices": [choice("".join(parts), reason, False)], "usage": usage()})

        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        async def events() -> AsyncIterator[str]:
            head = {"id": name, "object": chunk_kind, "created": created, "model": model_name}
            if chat:
                first = {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}
                yield f"data: {json.dumps(head | {'choices': [first]})}\n\n"
            async for piece, reason in pieces():
                yield f"data: {json.dumps(head | {'choices': [choice(piece, reason, True)]})}\n\n"
            if parsed.include_usage:
                yield f"data: {json.dumps(head | {'choices': [], 'usage': usage()})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    return app


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class BackgroundServer:
    """uvicorn serving ``app`` on a thread of this process (tests and ``bench-serve``); :meth:`stop`
    shuts it down as SIGTERM would (no new connections, running requests finish)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        port = port or free_port(host)
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, name="redrafter-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RedrafterError(f"the server on {self.url} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=120)
