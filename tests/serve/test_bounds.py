"""A real `loraft serve` on a loopback port over a tiny random GPT-2 read with --weights (offline, as a
GPT-2 adapter is served without the hub): the API key on every path, clear 4xx for bad requests,
adapters loaded only from --adapter-dir and removed while serving, slow or idle clients cut off, and
connections capped. The server keeps serving after each."""

import json
import shutil
import socket
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from loraft import lora
from loraft.adapters import save_adapter
from loraft.generate import generate
from loraft.models import load_model
from loraft.serve.app import Limits, create_app
from loraft.serve.registry import load_served

from ..helpers import loraft, randomise
from .conftest import serving

KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def folders(tiny_gpt2_weights, tmp_path_factory):
    """Instruction adapters over the tiny GPT-2 ("gpt2-small" with --weights): "echo" served from the start;
    in the allowed folder "extra" (loadable), "alien" (another base's fingerprint) and a link to "outside",
    which lies beyond it."""
    root = tmp_path_factory.mktemp("gpt2-adapters")
    allowed = root / "allowed"
    model, _ = load_model("gpt2-small", tiny_gpt2_weights)
    for seed, name in enumerate(("echo", "extra", "outside")):
        lora.apply_lora(model, rank=4, targets=["q", "v"], name=name)
        randomise(model, seed, std=0.2)
        where = allowed if name != "outside" else root
        save_adapter(model, where / name, name, task="instruction", template="alpaca", max_length=128)
    shutil.copytree(allowed / "extra", allowed / "alien")
    meta = json.loads((allowed / "alien" / "adapter.json").read_text())
    (allowed / "alien" / "adapter.json").write_text(json.dumps(meta | {"base_fingerprint": "0123456789abcdef"}))
    (allowed / "link").symlink_to(root / "outside")
    return allowed, root / "outside"


@pytest.fixture(scope="module")
def server(folders, tiny_gpt2_weights):
    allowed, _ = folders
    flags = [
        "--weights",
        str(tiny_gpt2_weights),
        "--adapter",
        f"echo={allowed / 'echo'}",
        "--adapter-dir",
        str(allowed),
    ]
    flags += ["--api-key", KEY, "--read-timeout-s", "1", "--max-connections", "6", "--max-tokens", "32", "--no-bf16"]
    with serving(*flags) as server:
        yield server


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        yield client


CHAT = {"model": "echo", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}


def still_serving(http):
    reply = http.post("/v1/chat/completions", json=CHAT)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] >= 1


def test_every_path_but_healthz_needs_the_key(server, http):
    paths = {
        (method.upper(), path) for path, ops in http.get("/openapi.json").json()["paths"].items() for method in ops
    }
    paths |= {("GET", "/"), ("GET", "/docs"), ("GET", "/openapi.json")}
    paths.remove(("GET", "/healthz"))
    assert ("POST", "/v1/chat/completions") in paths and ("DELETE", "/v1/adapters/{name}") in paths
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in sorted(paths):
            reply = httpx.request(method, server.url + path.replace("{name}", "echo"), headers=headers, json={})
            assert reply.status_code == 401, (method, path, reply.text)
            assert reply.headers["www-authenticate"] == "Bearer"
            body = reply.json()
            message = (
                body["error"]["message"]
                if path in ("/v1/chat/completions", "/v1/completions", "/v1/models")
                else body["error"]
            )
            assert message == "a valid API key is needed: send the header Authorization: Bearer KEY"
    assert httpx.get(server.url + "/healthz").json()["status"] == "ok"
    assert "echo" in [
        a["name"] for a in http.get("/v1/adapters").json()["adapters"]
    ]  # DELETE without a key did nothing
    still_serving(http)


def test_docs_load_nothing_from_elsewhere(http):
    page = http.get("/docs")
    assert page.status_code == 200 and "POST /v1/chat/completions" in page.text and "ChatRequest" in page.text
    assert "://" not in page.text  # no CDN, no external asset of any kind


def test_a_gpt2_base_is_served_offline_from_weights(http, tiny_gpt2_weights):
    """--weights: the base read from the local folder. A completion of the base model is the greedy
    continuation of loraft's own generate."""
    listed = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert listed[:2] == ["gpt2-small", "echo"]
    prompt = "The quick brown fox"
    reply = http.post(
        "/v1/completions", json={"model": "gpt2-small", "prompt": prompt, "max_tokens": 12, "temperature": 0}
    )
    assert reply.status_code == 200, reply.text
    model, tokenizer = load_model("gpt2-small", tiny_gpt2_weights)
    ids = tokenizer.encode(prompt)
    expected = generate(model, ids, 12, stop_ids={tokenizer.eos_id})
    body = reply.json()
    assert body["choices"][0]["text"] == tokenizer.decode(expected)
    assert body["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": len(expected),
        "total_tokens": len(ids) + len(expected),
    }
    assert body["object"] == "text_completion" and body["model"] == "gpt2-small"


LONG = "word " * 400  # ~400 tokens: the tiny GPT-2's context is 128
BAD = {
    "not-json": (b'{"model": "echo", "messages": [', 400, "the body is not valid JSON"),
    "body-too-large": (
        json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 300_000}]}),
        413,
        "over 262144 bytes",
    ),
    "too-many-tokens": (json.dumps({**CHAT, "max_tokens": 33}), 400, "max_tokens is 33; it must be between 1 and 32"),
    "prompt-past-the-context": (
        json.dumps({**CHAT, "messages": [{"role": "user", "content": LONG}]}),
        400,
        "the model's context length is 128",
    ),
    "unknown-model": (json.dumps({**CHAT, "model": "nope"}), 404, "no model named 'nope'; served: gpt2-small, echo"),
    "n-above-1": (json.dumps({**CHAT, "n": 2}), 400, "n: Input should be 1"),
    "tools": (json.dumps({**CHAT, "tools": []}), 400, "tools: Extra inputs are not permitted"),
    "two-turns-for-alpaca": (
        json.dumps({**CHAT, "messages": [{"role": "system", "content": "Be brief."}, *CHAT["messages"]]}),
        400,
        "the 'alpaca' template, which holds one instruction: send one user message",
    ),
    "temperature-a-string": (
        json.dumps({**CHAT, "temperature": "0"}),
        400,
        "temperature: Input should be a valid number",
    ),
}


@pytest.mark.parametrize("body, status, message", BAD.values(), ids=BAD.keys())
def test_bad_requests_get_one_clear_4xx_and_the_server_goes_on(http, body, status, message):
    reply = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert list(reply.json()) == ["error"] and message in error["message"], error
    assert error["type"] in ("invalid_request_error", "not_found_error")
    still_serving(http)


def test_adapters_are_loaded_only_from_the_adapter_dirs_and_removed_while_serving(http, folders):
    allowed, outside = folders
    refused = {
        str(outside): 403,  # an absolute path elsewhere
        "../outside": 403,  # a relative one climbing out
        "link": 403,  # a link inside that leads outside
    }
    for path, status in refused.items():
        reply = http.post("/v1/adapters", json={"name": "x", "path": path})
        assert reply.status_code == status, (path, reply.text)
        assert "is outside the folders adapters may be loaded from (--adapter-dir: " in reply.json()["error"]
    alien = http.post("/v1/adapters", json={"name": "alien", "path": "alien"})
    assert alien.status_code == 422 and "with other weights than the loaded gpt2-small" in alien.json()["error"]
    assert http.post("/v1/adapters", json={"name": "echo", "path": "extra"}).status_code == 409

    loaded = http.post("/v1/adapters", json={"name": "extra", "path": str(allowed / "extra")})
    assert loaded.status_code == 201, loaded.text
    assert loaded.json()["name"] == "extra" and loaded.json()["task"] == "instruction"
    assert "extra" in [m["id"] for m in http.get("/v1/models").json()["data"]]
    answer = http.post("/v1/chat/completions", json={**CHAT, "model": "extra"})
    assert answer.status_code == 200 and answer.json()["model"] == "extra"
    assert (
        answer.json()["choices"][0]["message"]["content"]
        != http.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]["content"]
    )  # another adapter, another answer

    assert http.delete("/v1/adapters/extra").json() == {"deleted": "extra"}
    gone = http.post("/v1/chat/completions", json={**CHAT, "model": "extra"})
    assert gone.status_code == 404 and "no model named 'extra'" in gone.json()["error"]["message"]
    assert http.delete("/v1/adapters/extra").status_code == 404
    still_serving(http)


def test_past_its_deadline_a_request_is_answered_504_and_its_work_stops(folders, tiny_gpt2_weights):
    """--timeout-s: a deadline shorter than any answer (in process: the same app, worker and model)."""
    allowed, _ = folders
    served = load_served({"echo": allowed / "echo"}, weights=tiny_gpt2_weights, bf16=False)
    with TestClient(create_app(served, Limits(timeout_s=1e-6))) as client:
        reply = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 32})
        assert reply.status_code == 504 and reply.json()["error"]["type"] == "timeout"
        assert (
            "ran past its deadline of 1e-06 s (--timeout-s); its work was cancelled" in reply.json()["error"]["message"]
        )
        events = client.post("/v1/chat/completions", json={**CHAT, "stream": True}).text.split("\n\n")
        assert '"timeout"' in events[-3] and events[-2] == "data: [DONE]"  # the stream ends with the error
        health = client.get("/healthz").json()
        assert health["in_flight"] == 0 and health["generate_requests"] == 0  # none ran to its end


def raw(server, data: bytes) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    if data:
        connection.sendall(data)
    return connection


def answer_and_seconds(connection) -> tuple[bytes, float]:
    started, received = time.monotonic(), b""
    while chunk := connection.recv(4096):
        received += chunk
    connection.close()
    return received, time.monotonic() - started


def test_a_slow_body_is_cut_off_after_the_read_timeout(server, http):
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    head += "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n"
    slow = raw(server, head.encode() + b'{"model": "echo",')  # then nothing more
    received, seconds = answer_and_seconds(slow)
    assert received.startswith(b"HTTP/1.1 408 ") and b"the request body did not arrive within 1 s" in received
    assert 0.8 < seconds < 5
    still_serving(http)


def test_slow_headers_and_idle_connections_are_cut_off(server, http):
    received, seconds = answer_and_seconds(raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"))
    assert received.startswith(b"HTTP/1.1 408 ") and b"headers did not arrive within 1 s" in received
    assert 0.8 < seconds < 5
    received, seconds = answer_and_seconds(raw(server, b""))  # connects, says nothing
    assert received == b"" and 0.8 < seconds < 5
    still_serving(http)


def test_connections_beyond_the_cap_are_refused(server, http):
    time.sleep(1.5)  # the earlier tests' idle connections are gone
    idle = [raw(server, b"") for _ in range(6)]
    try:
        refused, _ = answer_and_seconds(raw(server, b""))
        assert refused.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in refused
        assert b"connections open, its limit" in refused
    finally:
        for connection in idle:
            connection.close()
    time.sleep(0.2)
    still_serving(http)


def test_a_public_address_without_a_key_is_refused_at_start_up():
    result = loraft("serve", "--model", "gpt2-small", "--host", "0.0.0.0", "--port", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "loraft: error: --host 0.0.0.0 listens beyond this machine: give --api-key KEY (or set LORAFT_API_KEY), "
        "or --insecure to serve without one"
    )
