"""The real `openai` client against a real `loraft serve` on a loopback port: SmolLM2-135M with two
instruction adapters (Alpaca and chat template, random non-zero B), fp32 (--no-bf16) so that the
served answers can be compared with `loraft generate`, whose adapter is merged into the weights."""

import copy
import threading
import time

import httpx
import openai
import pytest
import torch

from loraft import lora
from loraft.adapters import save_adapter
from loraft.instruct import respond

from ..helpers import loraft
from .conftest import serving

KEY = "sk-test-openai"
QUESTION = "Name three primary colors."


@pytest.fixture(scope="module")
def reference(smollm2, tmp_path_factory):
    """A fp32 copy of SmolLM2 with two instruction adapters, each also saved to a folder: "qa" (Alpaca
    template, LoRA on every linear layer) and "chatty" (the model's chat template, q and v).
    Returns (model, tokenizer, {name: folder})."""
    model = copy.deepcopy(smollm2[0])
    folder = tmp_path_factory.mktemp("instruction-adapters")
    for seed, (name, template, targets) in enumerate(
        [("qa", "alpaca", ["all-linear"]), ("chatty", "chat", ["q", "v"])]
    ):
        torch.manual_seed(seed)
        lora.apply_lora(model, rank=8, targets=targets, name=name)
        for module in model.modules():
            if isinstance(module, lora.LoRALinear) and name in module.lora_B:
                torch.nn.init.normal_(module.lora_B[name], std=0.01)
        save_adapter(model, folder / name, name, task="instruction", template=template, max_length=256)
    model.requires_grad_(False)
    return model, smollm2[1], {"qa": folder / "qa", "chatty": folder / "chatty"}


@pytest.fixture(scope="module")
def adapters(reference):
    return reference[2]


@pytest.fixture(scope="module")
def server(adapters):
    flags = [f"--adapter=qa={adapters['qa']}", f"--adapter=chatty={adapters['chatty']}", "--no-bf16"]
    flags += ["--adapter-dir", str(adapters["qa"].parent)]
    with serving(*flags, "--api-key", KEY, "--max-queue", "4", "--max-batch", "2") as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def chat(client, model, content=QUESTION, **options):
    options = {"temperature": 0, **options}  # greedy unless asked
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **options)


def streamed(client, model, content=QUESTION, **options) -> tuple[str, list]:
    chunks = list(chat(client, model, content, stream=True, **options))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_a_chat_completion_and_its_stream_equal_loraft_generate(client, adapters):
    expected = loraft(
        "generate", "--adapter", str(adapters["qa"]), "--prompt", QUESTION, "--max-new-tokens", "32", "--no-bf16"
    )
    assert expected.returncode == 0, expected.stderr
    expected = expected.stdout.strip()
    assert len(expected.split()) > 4

    reply = chat(client, "qa", max_tokens=32)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant" and reply.model == "qa" and reply.object == "chat.completion"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.prompt_tokens > 30  # the Alpaca prompt around the question

    text, chunks = streamed(client, "qa", max_tokens=32, stream_options={"include_usage": True})
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert len(chunks) > 5  # token by token, not one piece
    assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == reply.usage


def test_a_chat_template_adapter_answers_as_loraft_does(client, reference):
    model, tokenizer, _ = reference
    lora.set_active(model, "chatty")
    expected = respond(model, tokenizer, {"template": "chat"}, QUESTION, "", 30)
    assert chat(client, "chatty", max_tokens=30).choices[0].message.content == expected
    base = chat(client, "smollm2-135m", max_tokens=30).choices[0].message.content
    assert base and base != expected  # the base model answers in the same chat template, without the adapter


def test_the_models_are_listed(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2-135m", "qa", "chatty"]
    assert [getattr(m, "parent", None) for m in models] == [None, "smollm2-135m", "smollm2-135m"]
    assert all(m.object == "model" and m.owned_by == "loraft" for m in models)


def test_two_adapters_in_one_streamed_batch_each_answer_as_alone(client, server):
    alone = {name: chat(client, name, max_tokens=24).choices[0].message.content for name in ("qa", "chatty")}
    before = httpx.get(server.url + "/healthz").json()
    together, start = {}, threading.Barrier(2)

    def ask(name):
        start.wait()
        together[name] = streamed(client, name, max_tokens=24)[0]

    threads = [threading.Thread(target=ask, args=(name,)) for name in alone]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    after = httpx.get(server.url + "/healthz").json()
    assert together == alone
    assert after["largest_decode_batch"] == 2  # they shared forward passes
    assert after["decode_steps"] - before["decode_steps"] < 2 * 24  # fewer steps than one after the other


def test_text_completions_stop_at_a_stop_string_streamed_or_not(client):
    whole = client.completions.create(model="qa", prompt="One, two, three, four,", max_tokens=20, temperature=0)
    text = whole.choices[0].text
    assert whole.object == "text_completion" and len(text) > 10
    stop = text[4:7]  # some text inside the continuation
    cut = client.completions.create(
        model="qa", prompt="One, two, three, four,", max_tokens=20, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(
            model="qa", prompt="One, two, three, four,", max_tokens=20, temperature=0, stop=[stop], stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == cut.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_repeats(client):
    options = dict(max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    first, second = (chat(client, "qa", **options).choices[0].message.content for _ in range(2))
    assert first == second
    assert chat(client, "qa", **{**options, "seed": 8}).choices[0].message.content != first


def test_past_the_queue_bound_503_and_those_admitted_lose_nothing(client, server):
    """--max-queue 4: of 8 streams at once, 4 are admitted and answered whole, 4 refused with Retry-After."""
    alone = chat(client, "qa", max_tokens=8).choices[0].message.content
    results, start = [], threading.Barrier(8)

    def ask():
        start.wait()
        try:
            results.append(streamed(client, "qa", max_tokens=8)[0])
        except openai.APIStatusError as e:
            results.append(e)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    refused = [r for r in results if isinstance(r, Exception)]
    answered = [r for r in results if isinstance(r, str)]
    assert len(answered) == 4 and len(refused) == 4
    assert answered == [alone] * 4
    for error in refused:
        assert error.status_code == 503 and error.response.headers["retry-after"] == "1"
        assert "its limit (--max-queue)" in error.message
    assert httpx.get(server.url + "/healthz").json()["in_flight"] == 0


def test_a_client_that_goes_away_stops_its_generation(client, server):
    before = httpx.get(server.url + "/healthz").json()
    stream = chat(client, "qa", "Write a long story about a dragon.", max_tokens=200, stream=True)
    for _ in zip(range(3), stream):
        pass
    stream.close()
    deadline = time.monotonic() + 30
    while (health := httpx.get(server.url + "/healthz").json())["running"] or health["in_flight"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert health["generate_requests"] == before["generate_requests"]  # cancelled, not ended
    assert health["generated_tokens"] - before["generated_tokens"] < 100  # not the 200 asked for


def test_an_adapter_removed_while_serving_finishes_its_requests_first(client, server):
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert http.post("/v1/adapters", json={"name": "qa2", "path": "qa"}).status_code == 201
    alone = chat(client, "qa2", max_tokens=24).choices[0].message.content
    assert alone == chat(client, "qa", max_tokens=24).choices[0].message.content  # the same files
    answer, ended = {}, {}

    def ask():
        answer["text"] = streamed(client, "qa2", max_tokens=24)[0]
        ended["stream"] = time.monotonic()

    asking = threading.Thread(target=ask)
    asking.start()
    while not httpx.get(server.url + "/healthz").json()["running"]:
        time.sleep(0.01)
    assert http.delete("/v1/adapters/qa2").json() == {"deleted": "qa2"}
    ended["delete"] = time.monotonic()
    asking.join(timeout=120)
    assert answer["text"] == alone and ended["stream"] <= ended["delete"]
    with pytest.raises(openai.NotFoundError, match="no model named 'qa2'"):
        chat(client, "qa2", max_tokens=4)


def test_a_one_turn_template_reads_the_user_message_as_its_instruction(smollm2):
    """Every template but the chat template (alpaca, the PEFT article's qa) asks one user message in that
    template and stops where `loraft generate --adapter` stops; a conversation is refused in one line."""
    from loraft.data.instruction import prompt_and_stops
    from loraft.errors import LoraftError
    from loraft.serve.openai_api import Message, chat_prompt

    tokenizer = smollm2[1]
    for template in ("alpaca", "qa"):
        ids, stops = chat_prompt(tokenizer, template, [Message(role="user", content=QUESTION)])
        assert (ids, stops) == prompt_and_stops(tokenizer, QUESTION, "", template)
        assert ("### QUESTION" if template == "qa" else "### Instruction") in tokenizer.decode(ids)
        with pytest.raises(LoraftError, match=f"the '{template}' template, which holds one instruction"):
            chat_prompt(
                tokenizer, template, [Message(role="system", content="Be brief."), Message(role="user", content="?")]
            )
    chat_ids, _ = chat_prompt(tokenizer, "chat", [Message(role="user", content=QUESTION)])
    assert "<|im_start|>user" in tokenizer.decode(chat_ids)
