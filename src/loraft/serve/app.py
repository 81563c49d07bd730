"""The HTTP API and the web page over a `Served` model.

OpenAI's chat and text completions and model list (`model` names an adapter or the base model;
openai_api.py), loraft's own classification and generation, adapters listed, loaded and removed
while serving, /healthz, the page, and /docs: /openapi.json as a page that loads nothing from elsewhere.

Bounded: a request body over `max_body_bytes` (413) or slower than `read_timeout_s` (408); at most
`max_queue` requests held at once, waiting or running (503 with Retry-After beyond); each request's
work cancelled at its deadline (`timeout_s`, 504) or when its client goes. With an API key, every
path but /healthz needs `Authorization: Bearer KEY` (401).

Errors are one line: OpenAI's error object on OpenAI's paths (400 for a bad request), {"error": "..."}
elsewhere (422 wrong types, missing fields or a limit exceeded, 404 unknown adapter or path, 400 an
adapter of the other task, 500 a fault of ours)."""

import asyncio
import hmac
import html
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.instruction import DEFAULT_TEMPLATE, prompt_and_stops
from ..errors import LoraftError
from ..tokenizer import check_unicode
from . import openai_api
from .batching import AdapterChange, Classify, Finished, Generate, Worker
from .openai_api import ChatRequest, Completion, CompletionRequest, TextStream
from .registry import NAME, Served, ServedAdapter, adapter_folder, check_adapters

PAGE = Path(__file__).with_name("page.html")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 256 * 1024
    max_texts: int = 64  # per request
    max_text_chars: int = 4000  # longer texts would be truncated to the adapter's max_length anyway
    max_new_tokens: int = 256
    max_queue: int = 256  # requests held at once, waiting or running
    timeout_s: float = 300.0  # a request's deadline, from its admission to its last token
    read_timeout_s: float = 10.0  # for a request's headers, then for its body
    max_connections: int = 200


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    texts: list[str]
    adapter: str


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    adapter: str
    instruction: str
    input: str = ""
    max_new_tokens: int = 128


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    path: str  # inside one of the --adapter-dir folders; a relative path is looked for in each


def error(path: str, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    body = openai_api.error_object(status, message) if path in openai_api.PATHS else {"error": message}
    return JSONResponse(body, status_code=status, headers=headers)


class ApiKey:
    """Every path but /healthz needs `Authorization: Bearer KEY` (401 otherwise)."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/healthz":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "a valid API key is needed: send the header Authorization: Bearer KEY"
                reply = error(scope["path"], 401, message, {"WWW-Authenticate": "Bearer"})
                return await reply(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse a request body over `max_bytes` with 413, counted as it arrives (chunked bodies too), and
    one that has not all arrived within `timeout_s` with 408; either closes the connection."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        body, more = b"", True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                message = f"the request body did not arrive within {self.timeout_s:g} s"
                return await self.refuse(scope, receive, send, 408, message)
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self.refuse(scope, receive, send, 413, f"the request body is over {self.max_bytes} bytes")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def refuse(scope, receive, send, status: int, message: str):
        await error(scope["path"], status, message, {"Connection": "close"})(scope, receive, send)


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        if e["type"] == "json_invalid":
            return f"the body is not valid JSON ({e['ctx']['error']} at character {e['loc'][-1]})"
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"][1:]).lstrip(".") or "body"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


class ClientGone(Exception):
    """The client closed the connection before its answer: nobody reads the response."""


class Admission:
    """What the server holds, on the event loop's thread: requests in flight (at most `max_queue`,
    waiting or running), and by adapter, so that an adapter being removed takes no new request and is
    removed once its last one has ended."""

    def __init__(self, max_queue: int):
        self.max_queue, self.in_flight = max_queue, 0
        self.using: Counter = Counter()
        self.removing: dict[str, asyncio.Event] = {}

    def admit(self, adapter: str | None):
        """Take a place for a request on `adapter`, or refuse it (503); returns the release."""
        if self.in_flight >= self.max_queue:
            raise HTTPException(
                503,
                f"the server holds {self.in_flight} requests, its limit (--max-queue); retry shortly",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1
        self.using[adapter] += 1
        released = False

        def release():
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
                self.using[adapter] -= 1
                if adapter in self.removing and not self.using[adapter]:
                    self.removing[adapter].set()

        return release

    async def drain(self, adapter: str):
        """Refuse new requests on `adapter`, and return once its requests in flight have ended."""
        done = self.removing[adapter] = asyncio.Event()
        if not self.using[adapter]:
            done.set()
        await done.wait()


class Run:
    """A request's work, on the event loop's side: the worker's answers within the request's deadline
    (504 past it), or until its client goes (`disconnected`, a task that ends then). `close` cancels
    what is left of the work and releases the request's place."""

    def __init__(self, job, release, timeout_s: float, disconnected=None):
        self.job, self.release, self.timeout_s, self.disconnected = job, release, timeout_s, disconnected
        self.deadline = asyncio.get_running_loop().time() + timeout_s
        self.events: asyncio.Queue | None = None  # a generation's: the worker's tokens, then Finished
        self.tokens = 0  # tokens generated so far

    async def wait(self, awaitable):
        task = asyncio.ensure_future(awaitable)
        others = {self.disconnected} if self.disconnected else set()
        remaining = max(0.0, self.deadline - asyncio.get_running_loop().time())
        try:
            done, _ = await asyncio.wait({task, *others}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # a stream whose client went away
            task.cancel()
            raise
        if task in done:
            return task.result()
        task.cancel()
        if done:
            raise ClientGone()
        raise HTTPException(
            504, f"the request ran past its deadline of {self.timeout_s:g} s (--timeout-s); its work was cancelled"
        )

    def close(self):
        self.job.cancelled = True
        self.release()
        if self.disconnected:
            self.disconnected.cancel()


async def until_disconnected(receive):
    while (await receive())["type"] != "http.disconnect":
        pass


class ReleasingStream(StreamingResponse):
    """A stream whose request's place is released however it ends, even if it never starts."""

    def __init__(self, content, run: Run):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.run = run

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.close()


def create_app(
    served: Served,
    limits: Limits = Limits(),
    window_ms: float = 5.0,
    max_batch: int = 32,
    max_batch_tokens: int = 1024,
    api_key: str | None = None,
    adapter_dirs: tuple[Path, ...] = (),
    model_thread: ThreadPoolExecutor | None = None,
) -> FastAPI:
    """The app serving `served`; its worker runs on `model_thread` (the thread that loaded the model, see
    batching.Worker) where given."""

    @asynccontextmanager
    async def lifespan(app):
        app.state.worker = Worker(served, window_ms, max_batch, max_batch_tokens, model_thread)
        app.state.admission = Admission(limits.max_queue)
        yield
        app.state.worker.close()

    base = served.model.name
    app = FastAPI(
        title="loraft",
        summary=f"{base} with LoRA adapters",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load their scripts from a CDN: /docs is our own
        redoc_url=None,
    )
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, timeout_s=limits.read_timeout_s)
    if api_key:
        app.add_middleware(ApiKey, key=api_key)  # added last, so it runs first

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc):
        return error(request.url.path, 400 if request.url.path in openai_api.PATHS else 422, validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return error(request.url.path, exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(LoraftError)
    async def refused(request, exc):  # e.g. a prompt longer than the model's context
        return error(request.url.path, 400 if request.url.path in openai_api.PATHS else 422, str(exc))

    @app.exception_handler(ClientGone)
    async def gone(request, exc):
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def failed(request, exc):
        return error(request.url.path, 500, f"internal error: {type(exc).__name__}: {exc}")

    def adapter_for(name: str, task: str) -> ServedAdapter:
        adapter = served.adapters.get(name)
        if adapter is None:
            raise HTTPException(404, f"no adapter named {name!r}; loaded: {', '.join(served.adapters) or 'none'}")
        if name in app.state.admission.removing:
            raise HTTPException(404, f"adapter {name!r} is being removed")
        if adapter.task != task:
            endpoint = "/v1/classify" if adapter.task == "classification" else "/v1/chat/completions or /v1/generate"
            raise HTTPException(400, f"adapter {name!r} is for {adapter.task}: use {endpoint}")
        return adapter

    def model_for(name: str) -> ServedAdapter | None:
        """The instruction adapter a request's `model` names; None: the base model."""
        if name == base:
            return None
        if name not in served.adapters:
            raise HTTPException(404, f"no model named {name!r}; served: {', '.join([base, *served.adapters])}")
        return adapter_for(name, "instruction")

    def check_text(where: str, text: str):
        check_unicode(text, where)  # JSON's "\ud800" escapes parse; the tokenizer would fail the whole batch
        if not text.strip():
            raise HTTPException(422, f"{where} is empty")
        if len(text) > limits.max_text_chars:
            raise HTTPException(422, f"{where} has {len(text)} characters; the limit is {limits.max_text_chars}")

    def start(request: Request, job, adapter: str | None, watch: bool) -> Run:
        release = app.state.admission.admit(adapter)
        disconnected = asyncio.ensure_future(until_disconnected(request.receive)) if watch else None
        run = Run(job, release, limits.timeout_s, disconnected)
        app.state.worker.submit(job)
        return run

    def generation(request, adapter, prompt_ids, stop_ids, max_tokens, watch: bool, **sampling) -> Run:
        """Start generating after `prompt_ids`, checked against the limits first: its Run, into whose
        `events` the worker puts each token."""
        room = served.model.context_length - len(prompt_ids)
        if room < 1:
            raise LoraftError(
                f"the prompt has {len(prompt_ids)} tokens; the model's context length is {served.model.context_length}"
            )
        if max_tokens is None:
            max_tokens = min(limits.max_new_tokens, room)
        if not 1 <= max_tokens <= limits.max_new_tokens:
            raise LoraftError(f"max_tokens is {max_tokens}; it must be between 1 and {limits.max_new_tokens}")
        if max_tokens > room:
            raise LoraftError(
                f"the prompt ({len(prompt_ids)} tokens) and max_tokens ({max_tokens}) exceed the model's context "
                f"length ({served.model.context_length})"
            )
        events, loop = asyncio.Queue(), asyncio.get_running_loop()
        job = Generate(
            adapter.name if adapter else None,
            prompt_ids,
            max_tokens,
            stop_ids,
            lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
            **sampling,
        )
        run = start(request, job, job.adapter, watch)
        run.events = events
        return run

    async def texts(run: Run, text: TextStream):
        """(new text, None) for each token as it comes, then (the rest, finish_reason)."""
        while True:
            event = await run.wait(run.events.get())
            if isinstance(event, Exception):
                raise event
            if isinstance(event, Finished):
                yield text.finish(), event.reason
                return
            run.tokens += 1
            new = text.add(event)
            if text.stopped:
                run.job.cancelled = True
                yield new, "stop"
                return
            yield new, None

    async def complete(request: Request, body, chat: bool):
        adapter = model_for(body.model)
        template = adapter.meta.get("template", DEFAULT_TEMPLATE) if adapter else None
        tokenizer = served.tokenizer
        if chat:
            for i, message in enumerate(body.messages):
                check_unicode(message.text(), f"messages[{i}].content")
            prompt_ids, stop_ids = openai_api.chat_prompt(tokenizer, template, body.messages)
        else:
            check_unicode(body.prompt, "prompt")
            prompt_ids, stop_ids = openai_api.completion_prompt(tokenizer, template, body.prompt)
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if max_tokens is None and not chat:
            max_tokens = 16  # OpenAI's default for text completions
        text = TextStream(tokenizer, body.stops(), strip=chat)
        sampling = dict(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
        run = generation(request, adapter, prompt_ids, stop_ids, max_tokens, not body.stream, **sampling)
        completion = Completion(chat, body.model, len(prompt_ids))
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return ReleasingStream(stream(run, text, completion, usage), run)
        try:
            parts = [part async for part in texts(run, text)]
            return completion.response("".join(new for new, _ in parts), parts[-1][1], run.tokens)
        finally:
            run.close()

    async def stream(run: Run, text: TextStream, completion: Completion, usage: bool):
        """Server-sent events in OpenAI's chunk format, each token's text as it comes, then [DONE]."""
        if completion.chat:
            yield completion.chunk("", first=True)
        try:
            async for new, reason in texts(run, text):
                if new:
                    yield completion.chunk(new)
                if reason:
                    yield completion.chunk(None, reason)
            if usage:
                yield completion.usage_chunk(run.tokens)
        except HTTPException as e:  # past the deadline: the stream ends with OpenAI's error object
            yield openai_api.event(openai_api.error_object(e.status_code, str(e.detail)))
        except Exception as e:
            yield openai_api.event(openai_api.error_object(500, f"internal error: {type(e).__name__}: {e}"))
        yield openai_api.DONE

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        """OpenAI's chat completion. `model`: an instruction adapter (its template: an Alpaca adapter takes
        one user message as its instruction) or the base model (its chat template); `stream` answers in
        server-sent events."""
        return await complete(request, body, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        """OpenAI's text completion: `prompt` continued as it is, through `model` (an instruction adapter or
        the base model)."""
        return await complete(request, body, chat=False)

    @app.get("/v1/models")
    async def models():
        """The base model and the adapters, as OpenAI's model list (an adapter's `parent` is the base)."""
        created = int(served.started)
        entries = [{"id": base, "object": "model", "created": created, "owned_by": "loraft", "parent": None}]
        for adapter in served.adapters.values():
            entry = {"id": adapter.name, "object": "model", "created": created, "owned_by": "loraft", "parent": base}
            entries.append(entry | {"task": adapter.task})
        return {"object": "list", "data": entries}

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request):
        """Labels and class probabilities of `texts` under one classification adapter."""
        adapter = adapter_for(body.adapter, "classification")
        if not body.texts:
            raise HTTPException(422, "texts: give at least one text")
        if len(body.texts) > limits.max_texts:
            raise HTTPException(422, f"texts: {len(body.texts)} texts; the limit is {limits.max_texts} per request")
        for i, text in enumerate(body.texts):
            check_text(f"texts[{i}]", text)
        job = Classify(adapter.name, body.texts)
        run = start(request, job, adapter.name, watch=True)
        try:
            probs = await run.wait(asyncio.wrap_future(job.future))
        finally:
            run.close()
        names = adapter.label_names
        results = [
            {"label": names[max(range(len(p)), key=p.__getitem__)], "probabilities": dict(zip(names, p))} for p in probs
        ]
        return {"adapter": adapter.name, "results": results}

    @app.post("/v1/generate")
    async def generate(body: GenerateRequest, request: Request):
        """The response of an instruction adapter, greedy, in the adapter's prompt template."""
        adapter = adapter_for(body.adapter, "instruction")
        check_text("instruction", body.instruction)
        check_unicode(body.input, "input")
        if len(body.input) > limits.max_text_chars:
            raise HTTPException(422, f"input has {len(body.input)} characters; the limit is {limits.max_text_chars}")
        if not 1 <= body.max_new_tokens <= limits.max_new_tokens:
            raise HTTPException(422, f"max_new_tokens must be between 1 and {limits.max_new_tokens}")
        tokenizer = served.tokenizer
        template = adapter.meta.get("template", DEFAULT_TEMPLATE)
        prompt_ids, stop_ids = prompt_and_stops(tokenizer, body.instruction, body.input, template)
        run = generation(request, adapter, prompt_ids, stop_ids, body.max_new_tokens, True)
        try:
            text = TextStream(tokenizer, [], strip=True)
            response = "".join([new async for new, _ in texts(run, text)])
        finally:
            run.close()
        return {"adapter": adapter.name, "response": response}

    @app.get("/v1/adapters")
    async def adapters():
        """The base model, each adapter, and the server's limits."""
        return {
            "base_model": base,
            "adapters": [a.describe() for a in served.adapters.values()],
            "limits": asdict(limits),
        }

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(body: LoadAdapterRequest):
        """Load the adapter folder `path` (inside an --adapter-dir folder) as `name`, after checking that it
        was trained on this base (its weights' fingerprint)."""
        if not adapter_dirs:
            raise HTTPException(
                403, "loading adapters while serving is off: start loraft serve with --adapter-dir DIR to allow it"
            )
        if not NAME.fullmatch(body.name):
            raise HTTPException(422, "name: letters, digits and _ . - (starting with a letter or digit)")
        if body.name in served.adapters or body.name == base:
            raise HTTPException(409, f"the name {body.name!r} is taken")
        try:
            folder = adapter_folder(body.path, adapter_dirs)
        except LoraftError as e:
            raise HTTPException(403, str(e)) from None
        adapter = check_adapters({body.name: folder}, base)[body.name]
        await asyncio.wrap_future(app.state.worker.submit(AdapterChange(body.name, adapter)))
        return adapter.describe()

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        """Remove adapter `name`: it takes no new request, and its requests in flight finish first."""
        admission = app.state.admission
        if name not in served.adapters or name in admission.removing:
            raise HTTPException(404, f"no adapter named {name!r}; loaded: {', '.join(served.adapters) or 'none'}")
        try:
            await admission.drain(name)
            await asyncio.wrap_future(app.state.worker.submit(AdapterChange(name)))
        finally:
            del admission.removing[name]
        return {"deleted": name}

    @app.get("/healthz")
    async def healthz(request: Request):
        worker = request.app.state.worker
        return {"status": "ok", **worker.stats, **worker.load, "in_flight": request.app.state.admission.in_flight}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return PAGE.read_text(encoding="utf-8")

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs():
        return docs_page(app.openapi())

    return app


def docs_page(spec: dict) -> str:
    """/openapi.json as a page: each endpoint, what it does, and its JSON body's fields. Self-contained."""
    schemas = spec.get("components", {}).get("schemas", {})

    def kind(prop: dict) -> str:
        if "$ref" in prop:
            return prop["$ref"].rsplit("/", 1)[-1]
        if "anyOf" in prop:
            return " | ".join(kind(p) for p in prop["anyOf"])
        if prop.get("type") == "array":
            return f"list of {kind(prop.get('items', {}))}"
        return prop.get("type", "any") if "const" not in prop else repr(prop["const"])

    parts = [
        '<!doctype html><meta charset="utf-8"><title>loraft API</title>',
        "<style>body{font:15px/1.45 system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem}"
        "td,th{text-align:left;padding:.2rem .6rem .2rem 0}code{background:#f4f6f8}</style>",
        f"<h1>{html.escape(spec['info']['title'])} API</h1><p>{html.escape(spec['info'].get('summary', ''))}. "
        'The machine-readable description: <a href="/openapi.json">/openapi.json</a>.</p>',
    ]
    shown = set()
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            parts.append(f"<h2><code>{method.upper()} {html.escape(path)}</code></h2>")
            description = operation.get("description") or operation.get("summary", "")
            parts.append(f"<p>{html.escape(description)}</p>")
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            names = [kind(body)] if "$ref" in body else []
            while names:
                name = names.pop(0)
                if name in shown or name not in schemas:
                    continue
                shown.add(name)
                schema = schemas[name]
                rows = "".join(
                    f"<tr><td><code>{html.escape(field)}</code></td><td>{html.escape(kind(prop))}</td>"
                    f"<td>{'required' if field in schema.get('required', []) else 'default ' + html.escape(repr(prop.get('default')))}</td></tr>"
                    for field, prop in schema.get("properties", {}).items()
                )
                parts.append(f"<p><b>{html.escape(name)}</b></p><table>{rows}</table>")
                names += re.findall(r"#/components/schemas/(\w+)", str(schema))
    return "\n".join(parts)
