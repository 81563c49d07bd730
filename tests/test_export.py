"""`loraft export`: each format read back by its own runtime (transformers, ONNX Runtime) or, for
llama.cpp's files, by the `gguf` package with llama.cpp's formula recomputed from the file alone
(llama.cpp itself runs them in benchmarks/llama_cpp_check.py: its build is too slow for CI)."""

import json

import numpy as np
import onnxruntime
import pytest
import torch
import transformers
from gguf import GGUFReader
from tokenizers import Tokenizer

from loraft import lora
from loraft.adapters import save_adapter
from loraft.classifier import TextFormat, predict_proba
from loraft.data.instruction import format_prompt
from loraft.data.sms_spam import load_sms_spam
from loraft.export import export
from loraft.finetune import prepare_model
from loraft.gguf_writer import write_gguf
from loraft.job import load_trained
from loraft.models import build_with, family_named, load_model
from loraft.weights import read_gguf

from .helpers import assert_clear_error, loraft, randomise
from .models.checkpoints import GEMMA_CHAT_TEMPLATE, REAL
from .models.checkpoints import PROMPT as IDS
from .models.test_gguf_files import GGUF_OF, checkpoint_folder


def instruction_adapter(model, folder, template="alpaca", **lora_options):
    """A random (non-zero) LoRA of `lora_options` over `model`, saved as an instruction adapter."""
    lora.apply_lora(model, lora.LoraConfig(**{"rank": 4, "alpha": 8, **lora_options}))
    randomise(model, std=0.1)
    return save_adapter(model, folder, task="instruction", template=template, max_length=64)


def logits_of(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor([ids]))


# every family llama.cpp reads, each scaling, and fused layers (Phi-3's qkv and gate_up) with a LoRA on
# only some of their parts, or on all of them (BLOOM's, whose rows llama.cpp regroups)
LORAS = {
    "smollm2-360m": ("standard", ["all-linear"]),
    "llama-3.2-1b": ("rslora", ["attention"]),
    "mistral-7b-v0.1": ("book", ["k", "o"]),
    "qwen2.5-0.5b": ("standard", ["q", "v", "mlp"]),
    "qwen3-0.6b": ("rslora", ["all-linear"]),
    "phi-4-mini": ("book", ["q", "v", "mlp"]),
    "gemma-3-270m": ("rslora", ["attention"]),
    "gemma-3-1b": ("standard", ["all-linear"]),
    "bloom-560m": ("book", ["query_key_value", "mlp"]),
}
assert set(LORAS) == set(GGUF_OF)


def llama_cpps_formula(lora_file, base_file):
    """The model llama.cpp runs: W + alpha / rank * B A for each lora_a / lora_b pair of `lora_file`
    (alpha from the file, rank from B) over the tensors of `base_file`, read from the two files alone."""
    reader = GGUFReader(lora_file)
    fields = {key: field.contents() for key, field in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    meta, tensors, _ = read_gguf(base_file)
    assert fields["general.architecture"] == meta["general.architecture"]
    pairs = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in reader.tensors}
    for name_a in [n for n in pairs if n.endswith(".lora_a")]:
        weight = name_a.removesuffix(".lora_a")
        A, B = pairs[name_a], pairs[f"{weight}.lora_b"]
        assert A.shape[1] == tensors[weight].shape[1] and B.shape == (tensors[weight].shape[0], A.shape[0])
        tensors[weight] = tensors[weight] + fields["adapter.lora.alpha"] / B.shape[1] * B @ A
    family = family_named(meta["general.architecture"], str(base_file), gguf=True)
    config = family.config_from_gguf(meta, tensors)
    return build_with(family, config, family.from_gguf_tensors(tensors, config), str(base_file)).eval()


def test_a_pissa_adapter_in_llama_cpps_file_gives_the_trained_model(tmp_path, sms_texts):
    """PiSSA trains over W minus its principal part; saved for the untouched base (rank 2r), llama.cpp's
    formula over the untouched base file gives the trained model's logits."""
    checkpoint_folder(tmp_path / "hf", "smollm2-360m", sms_texts[:500])
    model, tokenizer = load_model(str(tmp_path / "hf"))
    base_file = write_gguf(model, tmp_path / "base.gguf", "f32", tokenizer.gguf_metadata(model.config.vocab_size))
    model, _ = load_model(str(base_file))
    instruction_adapter(model, tmp_path / "adapter", init="pissa-niter-4", targets=["all-linear"])
    expected = logits_of(model)
    export(tmp_path / "adapter", "gguf-lora", tmp_path / "lora")
    assert (logits_of(llama_cpps_formula(tmp_path / "lora" / "adapter.gguf", base_file)) - expected).abs().max() < 1e-4


@pytest.mark.parametrize("name", LORAS)
def test_a_gguf_lora_file_is_llama_cpps_formula_over_the_base_file(tmp_path, sms_texts, name):
    """From the two files alone: W + alpha / rank * B A for each lora_a / lora_b pair (alpha from
    the adapter file, rank from B), over the base GGUF's tensors, read into a model, gives the
    adapter's logits; so does the merged GGUF export."""
    checkpoint_folder(tmp_path / "hf", name, sms_texts[:500])
    model, tokenizer = load_model(str(tmp_path / "hf"))
    base_file = write_gguf(model, tmp_path / "base.gguf", "f32", tokenizer.gguf_metadata(model.config.vocab_size))
    model, _ = load_model(str(base_file))
    before = logits_of(model)
    scaling, targets = LORAS[name]
    instruction_adapter(model, tmp_path / "adapter", scaling=scaling, targets=targets)
    expected = logits_of(model)
    assert (expected - before).abs().max() > 0.1  # the adapter changes the answer: a wrong layout would show

    export(tmp_path / "adapter", "gguf-lora", tmp_path / "lora")
    assert (logits_of(llama_cpps_formula(tmp_path / "lora" / "adapter.gguf", base_file)) - expected).abs().max() < 1e-4
    # over a GGUF base, Ollama gets the base file and the adapter
    modelfile = (tmp_path / "lora" / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM {base_file.resolve()}\nADAPTER ./adapter.gguf\n")

    export(tmp_path / "adapter", "gguf", tmp_path / "merged", "f32")
    merged, _ = load_model(str(tmp_path / "merged" / "model.gguf"))
    assert (logits_of(merged) - expected).abs().max() < 1e-4


def test_the_ollama_modelfile_prompts_as_the_adapter_was_trained(tmp_path, sms_texts):
    """Its TEMPLATE with the prompt filled in is the adapter's own prompt: the chat template rendered for
    one user turn (the BOS left to llama.cpp, which puts it first), or the Alpaca prompt."""
    checkpoint_folder(tmp_path / "hf", "gemma-3-270m", sms_texts[:500])  # its tokenizer starts texts with <bos>
    chat = "{{ bos_token }}" + GEMMA_CHAT_TEMPLATE  # and its chat template writes one, as Gemma 3's own does
    settings = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": chat}))
    for template in ("chat", "alpaca"):
        model, tokenizer = load_model(str(tmp_path / "hf"))
        instruction_adapter(model, tmp_path / template, template=template)
        export(tmp_path / template, "gguf", tmp_path / f"{template}-gguf", "q8_0")
        modelfile = (tmp_path / f"{template}-gguf" / "Modelfile").read_text()
        prompt = modelfile.split('TEMPLATE """')[1].split('"""')[0]
        question = "Name a prime number."
        expected = format_prompt(tokenizer, question, "", template)
        bos = tokenizer.decode(tokenizer.bos_prefix)
        assert bos and prompt.replace("{{ .Prompt }}", question) == expected.removeprefix(bos)
        assert 'PARAMETER stop "<eos>"' in modelfile and ('PARAMETER stop "<end_of_turn>"' in modelfile) == (
            template == "chat"
        )
        assert modelfile.startswith("FROM ./model.gguf\n")


@pytest.mark.parametrize("name", [*REAL, "gpt2"])
def test_an_hf_export_is_the_merged_model_in_transformers(tmp_path, sms_texts, tiny_gpt2_weights, name):
    if name == "gpt2":
        base = str(tiny_gpt2_weights)
    else:
        checkpoint_folder(tmp_path / "hf", name, sms_texts[:500])
        base = str(tmp_path / "hf")
    model, tokenizer = load_model(base)
    instruction_adapter(model, tmp_path / "adapter", targets=["all-linear", "head"])
    expected = logits_of(model)
    export(tmp_path / "adapter", "hf", tmp_path / "out")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (theirs(torch.tensor([IDS])).logits - expected).abs().max() <= 1e-3
    assert not theirs.config.tie_word_embeddings  # the head's LoRA untied it
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in sms_texts[:300]:
        assert hf_tokenizer(text)["input_ids"] == tokenizer.bos_prefix + tokenizer.encode(text)
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert tokenizer.eos_id in generation["eos_token_id"]


def test_the_spam_classifier_runs_in_transformers_and_onnx_runtime(tmp_path, spam_run):
    """The default job's adapter: transformers' LlamaForSequenceClassification gives the same labels on
    all 300 test messages, and ONNX Runtime, fed by tokenizer.json alone, probabilities within 1e-3 of
    loraft's (fp32)."""
    run, _ = spam_run
    adapter = run / "adapter"
    texts = load_sms_spam().test.texts
    model, tokenizer, meta = load_trained(adapter, "classification", bf16=False)
    ours = predict_proba(model, tokenizer, texts, TextFormat.of_adapter(meta))

    assert loraft("export", "--adapter", str(adapter), "--format", "hf", "--out", str(tmp_path / "hf")).returncode == 0
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.id2label == {0: "ham", 1: "spam"}
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        batch = hf_tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        theirs = hf(**batch).logits.softmax(-1)
    assert theirs.argmax(-1).tolist() == ours.argmax(-1).tolist()
    assert (theirs - ours).abs().max() <= 1e-3

    export(adapter, "onnx", tmp_path / "onnx")
    labels = json.loads((tmp_path / "onnx" / "labels.json").read_text())
    text_tokenizer = Tokenizer.from_file(str(tmp_path / "onnx" / "tokenizer.json"))
    encoded = text_tokenizer.encode_batch(texts)
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    inputs = {
        "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
    }
    (probabilities,) = session.run(None, inputs)
    assert np.abs(probabilities - ours.numpy()).max() <= 1e-3
    assert labels["labels"] == ["ham", "spam"]


@pytest.mark.parametrize("name", ["smollm2-360m", "gemma-3-270m"])
def test_exported_tokenizers_read_texts_as_loraft_does_around_a_template(tmp_path, sms_texts, name):
    """A classifier whose template puts tokens after the text: transformers' and ONNX Runtime's tokenizers
    put the template around each text and truncate the text alone, as loraft does, so that a long text
    keeps the suffix it is pooled at; and the classifiers give loraft's probabilities."""
    checkpoint_folder(tmp_path / "hf", name, sms_texts[:500])
    model, tokenizer = load_model(str(tmp_path / "hf"))
    prepare_model(model, "lora", 2, lora.LoraConfig(rank=4))
    randomise(model, std=0.1)
    fmt = TextFormat("Message: {text}\nSpam or not?", max_length=24)
    save_adapter(model, tmp_path / "adapter", task="classification", label_names=["a", "b"], **fmt.as_dict())
    texts = [sms_texts[0], " ".join(sms_texts[1:6])]  # one short, one far past 24 tokens
    expected = fmt.encode(tokenizer, texts)
    assert len(expected[1]) == 24 and expected[1][-3:] == expected[0][-3:]
    export(tmp_path / "adapter", "hf", tmp_path / "out-hf")
    export(tmp_path / "adapter", "onnx", tmp_path / "out-onnx")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out-hf")
    assert [hf_tokenizer(t, truncation=True)["input_ids"] for t in texts] == expected
    onnx_tokenizer = Tokenizer.from_file(str(tmp_path / "out-onnx" / "tokenizer.json"))
    encoded = onnx_tokenizer.encode_batch(texts)
    assert [[i for i, m in zip(e.ids, e.attention_mask) if m] for e in encoded] == expected

    model, tokenizer, meta = load_trained(tmp_path / "adapter", "classification", bf16=False)
    ours = predict_proba(model, tokenizer, texts, fmt).numpy()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out-hf").eval()
    assert type(hf).__name__ == hf.config.architectures[0]  # e.g. Gemma3TextForSequenceClassification
    with torch.no_grad():
        theirs = hf(**hf_tokenizer(texts, padding=True, truncation=True, return_tensors="pt")).logits.softmax(-1)
    assert np.abs(theirs.numpy() - ours).max() <= 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "out-onnx" / "model.onnx"))
    ids, mask = (np.array([getattr(e, key) for e in encoded], dtype=np.int64) for key in ("ids", "attention_mask"))
    (probabilities,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
    assert np.abs(probabilities - ours).max() <= 1e-4


def test_bad_exports_are_one_clear_line_and_write_nothing(tmp_path, sms_texts):
    checkpoint_folder(tmp_path / "hf", "smollm2-360m", sms_texts[:500])
    model, _ = load_model(str(tmp_path / "hf"))
    prepare_model(model, "lora", 2, lora.LoraConfig(rank=4))
    fmt = TextFormat(max_length=32).as_dict()
    classifier = save_adapter(model, tmp_path / "classifier", task="classification", label_names=["a", "b"], **fmt)
    model, _ = load_model(str(tmp_path / "hf"))
    instruction = instruction_adapter(model, tmp_path / "instruction")
    out = tmp_path / "out"

    def export_cli(adapter, fmt, *more):
        return loraft("export", "--adapter", str(adapter), "--format", fmt, "--out", str(out), *more)

    assert_clear_error(export_cli(classifier, "tflite"), "invalid choice: 'tflite'")
    assert_clear_error(export_cli(classifier, "gguf-lora"), "is a classifier", "--format hf, onnx or peft")
    assert_clear_error(export_cli(instruction, "onnx"), "--format onnx takes classification adapters")
    assert_clear_error(export_cli(instruction, "hf", "--dtype", "q8_0"), "--format hf writes f32, bf16, f16")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clear_error(export_cli(instruction, "gguf"), f"{out} already exists", "--overwrite")
    assert_clear_error(export_cli(instruction, "onnx", "--overwrite"), "takes classification adapters")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not list(tmp_path.glob(".out.*"))
    assert export_cli(instruction, "gguf", "--overwrite").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    # --overwrite never replaces the adapter's own folder, a folder above it, or one holding folders (a run)
    for where, message in (
        (instruction, "holds an input"),
        (tmp_path, "holds an input"),
        (out.parent / "run", "holds folders"),
    ):
        (out.parent / "run" / "adapter").mkdir(parents=True, exist_ok=True)
        result = loraft("export", "--adapter", str(instruction), "--format", "peft", "--out", str(where), "--overwrite")
        assert_clear_error(result, message)
    assert (instruction / "adapter.json").is_file() and (out.parent / "run" / "adapter").is_dir()

    for path in (tmp_path / "hf").iterdir():  # the adapter's base is gone
        path.unlink()
    (tmp_path / "hf").rmdir()
    assert_clear_error(export_cli(instruction, "hf", "--overwrite"), "unknown model", str(tmp_path / "hf"))
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    assert export_cli(instruction, "gguf-lora", "--overwrite").returncode == 0  # needs the adapter alone
