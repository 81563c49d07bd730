"""Compiled inference (loraft.inference): one graph for every batch shape, the eager model's
probabilities, and `eval --compile` on the default job's adapter."""

import json

import pytest
import torch
from torch._dynamo.utils import counters

from loraft.classifier import TextFormat, predict_proba
from loraft.data.sms_spam import load_sms_spam
from loraft.finetune import prepare_model
from loraft.inference import compile_for_inference
from loraft.job import load_trained
from loraft.lora import LoraConfig, merge
from loraft.models import load_model
from loraft.train import compiler_found

from .helpers import loraft, randomise

pytestmark = pytest.mark.skipif(not compiler_found(), reason="torch.compile on a CPU needs a C++ compiler")


def test_compiled_inference_is_one_graph_for_every_batch_shape(tiny_llama_dir, sms_texts):
    """Batches of 2 to 32 texts of many lengths, and a cached generation step between them: one graph
    (and one more for single-text batches: PyTorch specializes sizes 0 and 1), and the eager model's
    probabilities (fp32, up to the fused kernels' summation order)."""
    model, tokenizer = load_model(str(tiny_llama_dir))
    prepare_model(model, "lora", 2, LoraConfig(rank=4))
    randomise(model, std=0.1)
    merge(model)
    fmt = TextFormat(max_length=48)
    groups = [sms_texts[:2], sms_texts[2:34], sms_texts[34:41], sms_texts[41:299]]  # no batch of one
    eager = [predict_proba(model, tokenizer, texts, fmt) for texts in groups]
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    assert not compile_for_inference(model, texts=10)  # too few to pay: stays eager
    assert compile_for_inference(model, texts=10, asked=True)
    for texts, expected in zip(groups, eager):
        torch.testing.assert_close(predict_proba(model, tokenizer, texts, fmt), expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=model.new_cache())  # generation's cached steps run eager
    assert counters["stats"]["unique_graphs"] - graphs == 1
    predict_proba(model, tokenizer, sms_texts[:1], fmt)
    predict_proba(model, tokenizer, sms_texts[300:333], fmt)  # 32 texts, then one
    assert counters["stats"]["unique_graphs"] - graphs == 2


def test_eval_compiled_on_the_spam_adapter_gives_the_eager_labels(spam_run):
    """The default job's adapter: compiled bf16 probabilities within 0.02 of eager fp32 for 99% of the
    300 test messages (0.2 for all), at most one label apart; `loraft eval --compile` reports the job's
    own test accuracy."""
    run, report = spam_run
    texts = load_sms_spam().test.texts
    model, tokenizer, meta = load_trained(run / "adapter", "classification", bf16=False)
    reference = predict_proba(model, tokenizer, texts, TextFormat.of_adapter(meta))
    model, tokenizer, meta = load_trained(run / "adapter", "classification", bf16=True)
    assert compile_for_inference(model, len(texts), asked=True)
    compiled = predict_proba(model, tokenizer, texts, TextFormat.of_adapter(meta), autocast=True)
    apart = (compiled - reference).abs()[:, 1]
    # bf16's rounding: tiny for most messages, more for the few near the boundary (0.13 seen, 0.036 eager)
    assert apart.quantile(0.99) <= 0.02 and apart.max() <= 0.2
    assert (compiled.argmax(-1) != reference.argmax(-1)).sum() <= 1

    result = loraft("eval", "--adapter", str(run / "adapter"), "--compile")
    assert result.returncode == 0, result.stderr
    assert abs(json.loads(result.stdout)["accuracy"] - report["test_accuracy"]) <= 1 / 300
