"""The HTTP API in process (FastAPI's test client) over the real SmolLM2 base and real adapter files."""

import json

import pytest
import torch
from fastapi.testclient import TestClient
from torch._dynamo.utils import counters

from loraft import lora
from loraft.classifier import TextFormat, predict_proba
from loraft.generate import DecodeBatch
from loraft.inference import compile_for_inference
from loraft.serve.app import create_app
from loraft.serve.batching import Classify, Worker, classify, warm_up
from loraft.serve.registry import load_served
from loraft.train import compiler_found

from .conftest import LIMITS

SPAM = "WINNER!! As a valued network customer you have been selected to receive a £900 prize reward! To claim call 09061701461. Claim code KL341. Valid 12 hours only."
HAM = "Sorry, I'll be late for dinner, the bus is stuck in traffic. See you around 8?"


def test_classify_finds_the_spam(client):
    reply = client.post("/v1/classify", json={"adapter": "spam", "texts": [SPAM, HAM]})
    assert reply.status_code == 200
    body = reply.json()
    assert body["adapter"] == "spam"
    assert [r["label"] for r in body["results"]] == ["spam", "ham"]
    assert body["results"][0]["probabilities"]["spam"] > 0.95
    assert body["results"][1]["probabilities"]["ham"] > 0.95
    for result in body["results"]:
        assert sum(result["probabilities"].values()) == pytest.approx(1, abs=1e-5)


def test_one_batch_of_mixed_adapters_matches_each_adapter_alone_in_fp32(served, reference, sms_texts):
    """Three requests, three adapters (two head sizes, two poolings, two templates) gathered into one
    batch: every row gets its own LoRA and head, as the fp32 model with that adapter alone says."""
    model, _ = reference
    texts = {"spam": sms_texts[:5], "mood": sms_texts[5:8], "topics": sms_texts[8:12]}
    worker = Worker(served, window_ms=500, max_batch=64)  # long enough to gather all three
    try:
        jobs = [Classify(name, batch) for name, batch in texts.items()]
        for job in jobs:
            worker.submit(job)
        served_probs = {job.adapter: torch.tensor(job.future.result(timeout=60)) for job in jobs}
        stats = dict(worker.stats)
    finally:
        worker.close()
    assert stats["batches"] == 1 and stats["texts"] == 12
    assert stats["forward_passes"] == 2  # spam and mood share one pass; topics (3 classes, mean pooling) its own
    for name, batch in texts.items():
        lora.set_active(model, name)
        expected = predict_proba(model, served.tokenizer, batch, TextFormat.of_adapter(served.adapters[name].meta))
        assert served_probs[name].shape == expected.shape
        assert torch.allclose(served_probs[name], expected, atol=0.03), (name, served_probs[name], expected)


@pytest.mark.skipif(not compiler_found(), reason="torch.compile on a CPU needs a C++ compiler")
@torch._dynamo.config.patch(cache_size_limit=8)  # warm_up raises it for the whole process
def test_compiled_serving_gives_the_eager_probabilities_with_one_graph_per_adapter(reference, sms_texts):
    """`serve --compile` (fp32): the warm-up compiles each classifier's graphs (a batch of one, and one
    for every other batch shape); afterwards batches of other sizes and lengths, a batch mixing two
    adapters (eager), a generation step and the worker thread compile nothing more, and every
    probability is the eager one's."""
    folders = {name: reference[1][name] for name in ("spam", "mood", "qa")}
    compiled, eager = load_served(folders, bf16=False), load_served(folders, bf16=False)
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    compiled.compiled = compile_for_inference(compiled.model, texts=10, asked=True)
    warm_up(compiled)
    assert counters["stats"]["unique_graphs"] - graphs == 4  # spam and mood, each a batch of one and of more

    def rows(name, texts):
        return [(name, ids) for ids in compiled.adapters[name].format.encode(compiled.tokenizer, texts)]

    batches = [rows("spam", sms_texts[:7]), rows("mood", sms_texts[7:10]), rows("spam", sms_texts[10:11])]
    batches.append(rows("spam", sms_texts[11:14]) + rows("mood", sms_texts[14:16]))  # mixed: per row, eager
    for batch in batches:
        torch.testing.assert_close(
            torch.tensor(classify(compiled, batch)[0]), torch.tensor(classify(eager, batch)[0]), rtol=1e-4, atol=1e-5
        )
    lora.set_per_row(compiled.model, ["qa"])
    DecodeBatch(compiled.model).join([1, 2, 3])  # generation runs eager
    worker = Worker(compiled)
    try:
        job = worker.submit(Classify("spam", sms_texts[20:25]))
        served_probs = torch.tensor(job.result(timeout=60))
    finally:
        worker.close()
    expected = torch.tensor(classify(eager, rows("spam", sms_texts[20:25]))[0])
    torch.testing.assert_close(served_probs, expected, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] - graphs == 4


def test_generate_answers_with_the_instruction_adapter(client):
    reply = client.post(
        "/v1/generate", json={"adapter": "qa", "instruction": "What is the capital of France?", "max_new_tokens": 12}
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["adapter"] == "qa"
    assert "Paris" in reply.json()["response"]


def test_adapters_health_docs_and_page(client):
    listed = client.get("/v1/adapters").json()
    assert listed["base_model"] == "smollm2-135m"
    by_name = {a["name"]: a for a in listed["adapters"]}
    assert list(by_name) == ["spam", "mood", "topics", "qa"]
    assert by_name["spam"]["label_names"] == ["ham", "spam"] and by_name["spam"]["task"] == "classification"
    assert by_name["topics"]["pooling"] == "mean" and by_name["qa"]["task"] == "instruction"
    assert listed["limits"]["max_texts"] == LIMITS.max_texts

    before = client.get("/healthz").json()
    client.post("/v1/classify", json={"adapter": "mood", "texts": ["ok", "fine"]})
    after = client.get("/healthz").json()
    assert after["status"] == "ok" and after["texts"] == before["texts"] + 2

    docs = client.get("/docs").text
    assert "<code>POST /v1/classify</code>" in docs and "ClassifyRequest" in docs and "://" not in docs
    assert {"/v1/classify", "/v1/generate", "/v1/adapters", "/healthz"} <= set(
        client.get("/openapi.json").json()["paths"]
    )

    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="texts"' in page.text and "/v1/classify" in page.text
    assert "://" not in page.text  # no CDN, no external asset of any kind


def post_json(path, value):
    return ("POST", path, json.dumps(value).encode())


GOOD = {"adapter": "spam", "texts": ["hello"]}
BAD_INPUTS = {
    "not-json": (("POST", "/v1/classify", b'{"texts": ['), 422, "not valid JSON"),
    "not-an-object": (post_json("/v1/classify", ["hello"]), 422, "valid dictionary"),
    "texts-a-string": (
        post_json("/v1/classify", {**GOOD, "texts": "hello"}),
        422,
        "texts: Input should be a valid list",
    ),
    "text-a-number": (
        post_json("/v1/classify", {**GOOD, "texts": ["hi", 7]}),
        422,
        "texts[1]: Input should be a valid string",
    ),
    "text-null": (
        post_json("/v1/classify", {**GOOD, "texts": [None]}),
        422,
        "texts[0]: Input should be a valid string",
    ),
    "no-texts": (post_json("/v1/classify", {**GOOD, "texts": []}), 422, "at least one text"),
    "empty-text": (post_json("/v1/classify", {**GOOD, "texts": ["hi", " \n "]}), 422, "texts[1] is empty"),
    "too-many-texts": (post_json("/v1/classify", {**GOOD, "texts": ["hi"] * 5}), 422, "5 texts; the limit is 4"),
    "text-too-long": (
        post_json("/v1/classify", {**GOOD, "texts": ["x" * 201]}),
        422,
        "201 characters; the limit is 200",
    ),
    "adapter-missing": (post_json("/v1/classify", {"texts": ["hi"]}), 422, "adapter: Field required"),
    "adapter-a-number": (
        post_json("/v1/classify", {**GOOD, "adapter": 3}),
        422,
        "adapter: Input should be a valid string",
    ),
    "unknown-field": (post_json("/v1/classify", {**GOOD, "text": "hi"}), 422, "text: Extra inputs are not permitted"),
    "unknown-adapter": (
        post_json("/v1/classify", {**GOOD, "adapter": "nope"}),
        404,
        "no adapter named 'nope'; loaded: spam, mood, topics, qa",
    ),
    "classify-with-instruction-adapter": (
        post_json("/v1/classify", {**GOOD, "adapter": "qa"}),
        400,
        "use /v1/chat/completions or /v1/generate",
    ),
    "body-too-large": (post_json("/v1/classify", {**GOOD, "texts": ["x" * 190] * 11}), 413, "over 2000 bytes"),
    "generate-with-classifier": (
        post_json("/v1/generate", {"adapter": "spam", "instruction": "hi"}),
        400,
        "use /v1/classify",
    ),
    "generate-empty-instruction": (
        post_json("/v1/generate", {"adapter": "qa", "instruction": ""}),
        422,
        "instruction is empty",
    ),
    "generate-no-instruction": (post_json("/v1/generate", {"adapter": "qa"}), 422, "instruction: Field required"),
    "generate-input-too-long": (
        post_json("/v1/generate", {"adapter": "qa", "instruction": "hi", "input": "x" * 201}),
        422,
        "input has 201",
    ),
    "generate-zero-tokens": (
        post_json("/v1/generate", {"adapter": "qa", "instruction": "hi", "max_new_tokens": 0}),
        422,
        "between 1 and 16",
    ),
    "generate-too-many-tokens": (
        post_json("/v1/generate", {"adapter": "qa", "instruction": "hi", "max_new_tokens": 17}),
        422,
        "between 1 and 16",
    ),
    "generate-tokens-a-string": (
        post_json("/v1/generate", {"adapter": "qa", "instruction": "hi", "max_new_tokens": "5"}),
        422,
        "max_new_tokens: Input should be a valid integer",
    ),
    "get-on-a-post-endpoint": (("GET", "/v1/classify", b""), 405, "Method Not Allowed"),
    "unknown-path": (("GET", "/v2/everything", b""), 404, "Not Found"),
}


@pytest.mark.parametrize("request_, status, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_a_clear_4xx_and_harms_nothing(client, request_, status, message):
    method, path, body = request_
    reply = client.request(method, path, content=body, headers={"content-type": "application/json"})
    assert reply.status_code == status, reply.text
    assert list(reply.json()) == ["error"] and message in reply.json()["error"], reply.json()
    assert client.post("/v1/classify", json=GOOD).status_code == 200  # the server goes on


def test_a_chunked_body_over_the_limit_is_refused(client):
    chunks = iter([b'{"adapter": "spam", "texts": ["', b"x" * 1500, b"x" * 1500, b'"]}'])  # no Content-Length
    reply = client.post("/v1/classify", content=chunks, headers={"content-type": "application/json"})
    assert reply.status_code == 413 and "over 2000 bytes" in reply.json()["error"]


def test_served_over_the_gguf_blocks_answers_as_over_the_whole_file(reference, served):
    """`serve --quantize gguf`: the base's block layers keep SmolLM2's Q4_1 blocks; answers are the same."""
    kept = load_served(reference[1], "gguf")
    request = {"adapter": "spam", "texts": [SPAM, HAM]}
    with TestClient(create_app(kept, LIMITS)) as quantized, TestClient(create_app(served, LIMITS)) as whole:
        assert quantized.post("/v1/classify", json=request).json() == whole.post("/v1/classify", json=request).json()
        mixed = [{"adapter": name, "texts": [SPAM]} for name in ("mood", "topics")]
        assert [quantized.post("/v1/classify", json=r).json() for r in mixed] == [
            whole.post("/v1/classify", json=r).json() for r in mixed
        ]
