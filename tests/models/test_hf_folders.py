"""Models from a Hugging Face model folder or a hub id: sharded safetensors, tokenizer.json with its
special tokens and chat template, the hub's cache used offline, and the hub's refusals (a gated or
missing repository) answered by a local HTTP server that speaks as the hub does."""

import http.server
import json
import threading

import numpy as np
import pytest
import torch
import transformers
from tokenizers import AddedToken, processors

from loraft.classifier import TextFormat
from loraft.errors import LoraftError
from loraft.models import HUB_MODELS, load_model
from loraft.tokenizer import O200K_SPLIT, PRE_TOKENIZERS, BPETokenizer

from ..helpers import assert_clear_error, loraft
from .checkpoints import (
    CHAT_TEMPLATE,
    PROMPT,
    SENTENCEPIECE_STYLES,
    hf_checkpoint,
    write_sentencepiece_tokenizer,
    write_tokenizer,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory, sms_texts):
    """A tiny random Qwen2.5 saved in shards, with a Qwen2-style tokenizer trained on SMS messages."""
    folder = tmp_path_factory.mktemp("qwen2")
    reference = hf_checkpoint(folder, "qwen2.5-0.5b", shard_size="100KB")
    write_tokenizer(folder, sms_texts[:2000], pre="qwen2")
    return folder, reference


def test_a_sharded_folder_loads_with_its_tokenizer(qwen_folder, sms_texts):
    folder, reference = qwen_folder
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    model, tokenizer = load_model(str(folder))
    with torch.no_grad():
        assert (model(torch.tensor([PROMPT])) - reference(torch.tensor([PROMPT])).logits).abs().max() <= 1e-4
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    texts = sms_texts[2000:2300]  # not the messages the tokenizer was trained on
    assert tokenizer.encode_batch(texts) == [hf_tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    assert tokenizer.decode(tokenizer.encode(texts[0])) == texts[0]
    assert (tokenizer.eos_id, tokenizer.pad_id) == (hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (2, 0)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert model.name == str(folder)


def test_a_missing_shard_or_tokenizer_is_one_clear_line(tmp_path, qwen_folder):
    folder, _ = qwen_folder
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in folder.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    (broken / "tokenizer.json").unlink()
    assert_clear_error(loraft("generate", "--model", str(broken), "--prompt", "hi"), "no tokenizer.json")
    shard = sorted(broken.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    assert_clear_error(
        loraft("generate", "--model", str(broken), "--prompt", "hi"),
        "weight shards the index names are missing",
        shard.name,
    )


def test_a_hub_id_loads_from_the_hubs_cache_offline(tmp_path, monkeypatch, qwen_folder, sms_texts):
    """The cache laid out as huggingface_hub lays out a download (snapshots/COMMIT, refs/main)."""
    repo = tmp_path / "hub" / "models--someone--tiny-qwen3"
    snapshot = repo / "snapshots" / COMMIT
    reference = hf_checkpoint(snapshot, "qwen3-0.6b")
    write_tokenizer(snapshot, sms_texts[:2000], pre="qwen2")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = loraft("generate", "--model", "someone/tiny-qwen3", "--prompt", "Free entry", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    _, tokenizer = load_model(str(snapshot))
    prompt = torch.tensor([tokenizer.encode("Free entry")])
    greedy = reference.generate(prompt, max_new_tokens=6, do_sample=False)[0]
    assert result.stdout.strip() == tokenizer.decode(greedy.tolist()).strip()
    absent = loraft("generate", "--model", "someone/absent", "--prompt", "x")
    assert_clear_error(absent, "could not download someone/absent", "not in the hub's cache", "--model FOLDER")


class HubRefusals(http.server.BaseHTTPRequestHandler):
    """Answers every request as huggingface.co answers for a gated repository or one that does not exist."""

    def do_GET(self):
        gated = "gated" in self.path
        self.send_response(403 if gated else 404)
        self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        body = json.dumps({"error": "Access to this model is restricted" if gated else "Repository not found"})
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_gated_and_missing_repositories_say_what_to_do(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubRefusals)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        gated = loraft("generate", "--model", "meta-llama/gated-model", "--prompt", "x")
        assert_clear_error(gated, "meta-llama/gated-model is gated", "accept its licence", "set HF_TOKEN")
        missing = loraft("generate", "--model", "nobody/no-such-model", "--prompt", "x")
        assert_clear_error(missing, "nobody/no-such-model: no such model on the Hugging Face hub")
    finally:
        server.shutdown()


def test_weights_replace_a_known_models_download(tmp_path, qwen_folder):
    folder, _ = qwen_folder
    named = loraft(
        "generate", "--model", "qwen2.5-0.5b", "--weights", str(folder), "--prompt", "hi", "--max-new-tokens", "2"
    )
    assert named.returncode == 0, named.stderr
    assert_clear_error(
        loraft("generate", "--model", str(folder), "--weights", str(folder), "--prompt", "hi"), "has none to replace"
    )


@pytest.mark.parametrize("info", HUB_MODELS, ids=lambda info: info.name)
def test_each_known_hub_model_has_the_parameter_count_of_transformers(info):
    """`loraft models` counts from the config.json fields it keeps; transformers counts from the same."""
    from loraft.models import parameter_count

    config = transformers.AutoConfig.for_model(**info.hub_config)
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(config)
    assert parameter_count(info.name) == sum(p.numel() for p in reference.parameters())


def test_the_jobs_train_over_a_model_folder(tmp_path, qwen_folder, small_sms_tsv):
    """Both jobs for real over a folder: the adapters remember it as their base and load over it again."""
    folder, _ = qwen_folder
    run = tmp_path / "spam"
    common = ["--model", str(folder), "--rank", "4", "--lr", "1e-3", "--quiet", "--no-compile"]
    trained = loraft(
        "train", *common, "--data", str(small_sms_tsv), "--out", str(run), "--epochs", "5", "--eval-every", "4"
    )
    assert trained.returncode == 0, trained.stderr
    assert json.loads((run / "adapter" / "adapter.json").read_text())["base_model"] == str(folder)
    losses = [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0]
    classified = loraft("classify", "--adapter", str(run / "adapter"), "Free prize, call now")
    assert classified.returncode == 0 and json.loads(classified.stdout)["label"] in ("ham", "spam")

    data = tmp_path / "instructions.json"
    data.write_text(json.dumps([{"instruction": f"Repeat {n}", "input": "", "output": f"{n} {n}"} for n in range(40)]))
    instructed = loraft(
        "instruct", *common, "--data", str(data), "--out", str(tmp_path / "chat"), "--template", "chat",
        "--epochs", "1", "--max-new-tokens", "4",
    )  # fmt: skip
    assert instructed.returncode == 0, instructed.stderr
    answer = loraft("generate", "--adapter", str(tmp_path / "chat" / "adapter"), "--instruction", "Repeat 7")
    assert answer.returncode == 0, answer.stderr


@pytest.mark.parametrize("pre", PRE_TOKENIZERS)
def test_token_ids_equal_transformers_on_every_sms_message(tmp_path, pre, sms_texts):
    """One tokenizer.json per pre-tokenizer kind (SmolLM2's, Llama 3's, Qwen2's, GPT-4o's and GPT-2's splits),
    trained here on 2,000 messages since no real one can be had offline: loraft's ids from the file, and
    from the GGUF metadata it writes, equal transformers' on all 5,574 messages."""
    write_tokenizer(tmp_path, sms_texts[:2000], pre=pre)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 2}))
    ours = BPETokenizer.from_folder(tmp_path, {})
    expected = transformers.AutoTokenizer.from_pretrained(tmp_path)(sms_texts, add_special_tokens=False).input_ids
    assert len(sms_texts) == 5574
    assert ours.encode_batch(sms_texts) == expected
    metadata = ours.gguf_metadata(ours.vocab_size)
    assert metadata["tokenizer.ggml.pre"] == pre
    assert BPETokenizer.from_gguf(metadata).encode_batch(sms_texts) == expected


@pytest.mark.parametrize("layout", ["post-processor", "add_bos_token", "none"])
def test_each_sequence_starts_as_transformers_starts_a_text(tmp_path, layout, sms_texts):
    """BOS as Llama 3's and Gemma's tokenizer.json put it (their post-processor), or none (Qwen2's; and
    tokenizer_config.json's add_bos_token, which transformers ignores beside a tokenizer.json): loraft's
    `bos_prefix` before a text gives transformers' tokenizer(text), from the folder and from the GGUF
    metadata it writes; a classifier's input starts with it."""
    tokenizer = write_tokenizer(tmp_path, sms_texts[:2000], pre="llama-bpe")
    tokenizer.add_special_tokens([AddedToken("<|begin_of_text|>", special=True, normalized=False)])
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    if layout == "post-processor":
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
        )
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text()) | {"bos_token": "<|begin_of_text|>"}
    if layout == "add_bos_token":
        settings |= {"add_bos_token": True, "add_eos_token": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    ours = BPETokenizer.from_folder(tmp_path, {})
    expected = transformers.AutoTokenizer.from_pretrained(tmp_path)(sms_texts).input_ids
    assert ours.bos_prefix == ([bos] if layout == "post-processor" else [])
    assert [ours.bos_prefix + ids for ids in ours.encode_batch(sms_texts)] == expected
    from_gguf = BPETokenizer.from_gguf(ours.gguf_metadata(ours.vocab_size))
    assert from_gguf.bos_prefix == ours.bos_prefix
    assert TextFormat(max_length=512).encode(ours, sms_texts[:50]) == expected[:50]
    # an adapter from before BOS was used keeps running without it; pooling at a BOS is refused
    old = TextFormat.of_adapter({"max_length": 512, "pooling": "last"})
    assert old.encode(ours, sms_texts[:50]) == ours.encode_batch(sms_texts[:50])
    if ours.bos_prefix:
        with pytest.raises(LoraftError, match="--pooling first would pool at the BOS token"):
            TextFormat(pooling="first").encode(ours, sms_texts[:1])


def test_gpt_4o_splits_text_as_tiktokens_o200k_base(monkeypatch):
    from tiktoken_ext import openai_public

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: {})  # its ranks: a download
    assert O200K_SPLIT == openai_public.o200k_base()["pat_str"]


@pytest.mark.parametrize("style", SENTENCEPIECE_STYLES)
def test_sentencepiece_token_ids_equal_transformers_on_every_sms_message(tmp_path, style, sms_texts):
    """Gemma's and Llama 2's (Phi-3's) SentencePiece tokenizer.json, made here from 2,000 messages (see
    `write_sentencepiece_tokenizer`): loraft's ids from the file, and from the "llama" GGUF metadata it
    writes, equal transformers' (GemmaTokenizer, LlamaTokenizer) on all 5,574 messages, and decode
    gives the messages back. One exception, llama.cpp's: it puts its ▁ before a message that starts with
    a space, where transformers' Metaspace adds none, so there the GGUF's ids are transformers' for the
    message with one more space (and only the GGUF's decode gives such a message back whole)."""
    write_sentencepiece_tokenizer(tmp_path, sms_texts[:2000], style)
    ours = BPETokenizer.from_folder(tmp_path, {})
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(theirs).__name__ == SENTENCEPIECE_STYLES[style][0]
    expected = theirs(sms_texts, add_special_tokens=False).input_ids
    assert ours.encode_batch(sms_texts) == expected
    assert [ours.decode(ids) for ids in expected] == theirs.batch_decode(expected)
    metadata = ours.gguf_metadata(ours.vocab_size)
    space_prefix = SENTENCEPIECE_STYLES[style][2]
    assert (metadata["tokenizer.ggml.model"], metadata["tokenizer.ggml.add_space_prefix"]) == ("llama", space_prefix)
    assert "tokenizer.ggml.merges" not in metadata
    types = dict(zip(metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]))
    assert (types["<unk>"], types["<0x41>"], types[theirs.eos_token], types["▁"]) == (2, 6, 3, 1)
    from_gguf = BPETokenizer.from_gguf(metadata)
    spaced = [" " + text if space_prefix and text.startswith(" ") else text for text in sms_texts]
    assert len(set(spaced) - set(sms_texts)) == (9 if space_prefix else 0)
    ids = from_gguf.encode_batch(sms_texts)
    assert ids == theirs(spaced, add_special_tokens=False).input_ids
    assert [from_gguf.decode(i) for i in ids] == sms_texts
    assert (from_gguf.eos_id, from_gguf.bos_id, from_gguf.bos_prefix) == (ours.eos_id, ours.bos_id, [ours.bos_id])
    assert ours.bos_prefix == [ours.bos_id] == theirs(sms_texts[0]).input_ids[:1]


def test_a_sentencepiece_tokenizer_llama_cpp_cannot_read_is_refused(tmp_path, sms_texts):
    write_sentencepiece_tokenizer(tmp_path, sms_texts[:500], "gemma", vocab_size=300)
    ours = BPETokenizer.from_folder(tmp_path, {})
    state = json.loads(ours.tokenizer.to_str())
    lowercased = json.loads(json.dumps(state))
    lowercased["normalizer"] = {"type": "Lowercase"}
    trained = json.loads(json.dumps(state))  # merges a trainer made, not every split of every token
    trained["model"]["merges"] = trained["model"]["merges"][::2]
    for changed, message in [(lowercased, "normalizes or splits text in a way"), (trained, "merges are not")]:
        (tmp_path / "tokenizer.json").write_text(json.dumps(changed))
        with pytest.raises(LoraftError, match=message):
            BPETokenizer.from_folder(tmp_path, {}).gguf_metadata(ours.vocab_size)


def test_a_gguf_of_an_unsupported_architecture_is_one_clear_line(tmp_path):
    from gguf import GGUFWriter

    writer = GGUFWriter(tmp_path / "falcon.gguf", "falcon")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_clear_error(
        loraft("generate", "--model", str(tmp_path / "falcon.gguf"), "--prompt", "x"),
        "architecture 'falcon' is not supported; loraft reads gpt2, llama",
    )


def test_weights_of_the_wrong_shape_are_one_clear_line_and_nothing_is_written(tmp_path, qwen_folder, small_sms_tsv):
    folder, _ = qwen_folder
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for file in folder.iterdir():
        (wrong / file.name).write_bytes(file.read_bytes())
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    run = tmp_path / "run"
    result = loraft("train", "--model", str(wrong), "--data", str(small_sms_tsv), "--out", str(run), "--quiet")
    assert_clear_error(result, "the weights do not fit", "ff.gate.weight")
    assert not run.exists()
