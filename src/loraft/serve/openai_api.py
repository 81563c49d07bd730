"""OpenAI's chat and text completions as loraft serves them: the request schemas, the prompt a request
becomes (an Alpaca adapter's template, else the model's chat template), the text of the generated
tokens as it streams (stop strings, a chat answer's whitespace), and OpenAI's response, chunk and
error objects."""

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..data.instruction import encode_prompts, end_id, prompt_and_stops, render_chat
from ..errors import LoraftError

# The endpoints that answer in OpenAI's shapes (errors included)
PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class Sampling(BaseModel):
    """What chat and text completions share. n is 1 only; other OpenAI options are refused by name."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default: sampled; 0 is greedy
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, max_length=4)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, as OpenAI's, and not used

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if any(not s for s in stops):
            raise LoraftError("stop: a stop string is empty")
        return stops


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens


class CompletionRequest(Sampling):
    prompt: str


def chat_prompt(tokenizer, template: str | None, messages: list[Message]) -> tuple[list[int], frozenset[int]]:
    """The prompt's token ids and the stop tokens of a conversation. An adapter of a one-turn template
    (alpaca, qa) reads one user message as its instruction, as `loraft generate --adapter` does; a chat
    adapter or the base model (None) reads the whole conversation in the model's chat template."""
    turns = [{"role": m.role, "content": m.text()} for m in messages]
    if template not in (None, "chat"):
        if len(turns) != 1 or turns[0]["role"] != "user":
            raise LoraftError(
                f"messages: this adapter answers in the {template!r} template, which holds one instruction: "
                "send one user message"
            )
        return prompt_and_stops(tokenizer, turns[0]["content"], "", template)
    if not tokenizer.chat_template:
        raise LoraftError("the base model's tokenizer has no chat template: use /v1/completions")
    (ids,) = encode_prompts(tokenizer, [render_chat(tokenizer, turns, add_generation_prompt=True)], "chat")
    return ids, frozenset({end_id(tokenizer, "chat"), tokenizer.eos_id})


def completion_prompt(tokenizer, template: str | None, prompt: str) -> tuple[list[int], frozenset[int]]:
    """The prompt as it is, started as the tokenizer starts a text (as `loraft generate --prompt`);
    it stops at the end-of-text token, and at the end token of an adapter's template."""
    stops = {tokenizer.eos_id} | ({end_id(tokenizer, template)} if template else set())
    return tokenizer.bos_prefix + tokenizer.encode(prompt), frozenset(stops)


class TextStream:
    """The text of generated tokens as they come. A character split over tokens waits for its last byte,
    and text that may begin a stop string waits until it cannot; at a stop string the text ends, before
    it. `strip`: without whitespace at either end (a chat answer, as `loraft generate` prints it)."""

    def __init__(self, tokenizer, stops: list[str], strip: bool):
        self.tokenizer, self.stops, self.strip = tokenizer, stops, strip
        self.ids: list[int] = []
        self.sent = 0  # characters handed out
        self.stopped = False  # a stop string was found

    def text(self) -> str:
        text = self.tokenizer.decode(self.ids)
        text = text.lstrip() if self.strip else text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        self.stopped = bool(hits)
        return text[: min(hits)] if hits else text

    def add(self, token: int) -> str:
        """The new text that is safe to hand out."""
        self.ids.append(token)
        text = self.text()
        if self.stopped:
            return self.finish()
        held = max([k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])], default=0)
        if self.strip:
            held = max(held, len(text) - len(text.rstrip()))
        if text.endswith("\ufffd"):
            held = max(held, 1)
        new = text[self.sent : len(text) - held]
        self.sent += len(new)
        return new

    def finish(self) -> str:
        """The rest of the text, once no token comes any more."""
        text = self.text()
        text = text.rstrip() if self.strip else text
        new = text[self.sent :]
        self.sent += len(new)
        return new


class Completion:
    """OpenAI's objects for one request: the response, its stream's chunks, usage."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int):
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def usage(self, completion_tokens: int) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def head(self, chunk: bool = False) -> dict:
        kind = self.object + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(self, text: str, finish_reason: str, completion_tokens: int) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice["finish_reason"] = finish_reason
        return {**self.head(), "choices": [choice], "usage": self.usage(completion_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> str:
        """One server-sent event: new text (the first chat chunk also gives the role), or the end."""
        if self.chat:
            delta = {"role": "assistant", "content": text or ""} if first else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return event({**self.head(chunk=True), "choices": [choice]})

    def usage_chunk(self, completion_tokens: int) -> str:
        return event({**self.head(chunk=True), "choices": [], "usage": self.usage(completion_tokens)})


def event(value: dict) -> str:
    return f"data: {json.dumps(value, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"

ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 503: "server_overloaded", 504: "timeout"}


def error_object(status: int, message: str) -> dict:
    """OpenAI's error body."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}
