"""The HTTP API and the web page over a `Served` model.

Errors are JSON {"error": "one line"}: 413 body too large, 422 wrong types, missing fields or a
limit exceeded, 404 unknown adapter or path, 400 an adapter of the other task, 500 a fault of ours."""

import asyncio
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LoraftError
from ..tokenizer import check_unicode
from .batching import Classify, Generate, MicroBatcher
from .registry import Served, ServedAdapter

PAGE = Path(__file__).with_name("page.html")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 256 * 1024
    max_texts: int = 64  # per request
    max_text_chars: int = 4000  # longer texts would be truncated to the adapter's max_length anyway
    max_new_tokens: int = 256


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


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class BodyLimit:
    """Refuse a request body over `max_bytes` with 413, counted as it arrives (chunked bodies too)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await error(413, f"the request body is over {self.max_bytes} bytes")(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        if e["type"] == "json_invalid":
            return f"the body is not valid JSON ({e['ctx']['error']} at character {e['loc'][-1]})"
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"][1:]).lstrip(".") or "body"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


def create_app(served: Served, limits: Limits = Limits(), window_ms: float = 5.0, max_batch: int = 32) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        app.state.batcher = MicroBatcher(served, window_ms, max_batch)
        yield
        app.state.batcher.close()

    app = FastAPI(title="loraft", summary=f"{served.model.name} with LoRA adapters", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc):
        return error(422, validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(LoraftError)
    async def refused(request, exc):  # e.g. a prompt longer than the model's context
        return error(422, str(exc))

    @app.exception_handler(Exception)
    async def failed(request, exc):
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    def adapter_for(name: str, task: str) -> ServedAdapter:
        adapter = served.adapters.get(name)
        if adapter is None:
            raise HTTPException(404, f"no adapter named {name!r}; loaded: {', '.join(served.adapters)}")
        if adapter.task != task:
            endpoint = "/v1/classify" if adapter.task == "classification" else "/v1/generate"
            raise HTTPException(400, f"adapter {name!r} is a {adapter.task} adapter: use {endpoint}")
        return adapter

    def check_text(where: str, text: str):
        check_unicode(text, where)  # JSON's "\ud800" escapes parse; the tokenizer would fail the whole batch
        if not text.strip():
            raise HTTPException(422, f"{where} is empty")
        if len(text) > limits.max_text_chars:
            raise HTTPException(422, f"{where} has {len(text)} characters; the limit is {limits.max_text_chars}")

    async def run(request: Request, job):
        return await asyncio.wrap_future(request.app.state.batcher.submit(job))

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
        probs = await run(request, Classify(adapter.name, body.texts))
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
        response = await run(request, Generate(adapter.name, body.instruction, body.input, body.max_new_tokens))
        return {"adapter": adapter.name, "response": response}

    @app.get("/v1/adapters")
    async def adapters():
        return {
            "base_model": served.model.name,
            "adapters": [a.describe() for a in served.adapters.values()],
            "limits": asdict(limits),
        }

    @app.get("/healthz")
    async def healthz(request: Request):
        return {"status": "ok", **request.app.state.batcher.stats}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return PAGE.read_text(encoding="utf-8")

    return app
