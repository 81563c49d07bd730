"""ONNX Runtime: a classification adapter merged into its base as one ONNX graph, input_ids and
attention_mask (right-padded rows, any batch size and length) in, class probabilities out, pooled as
the adapter was trained; beside it tokenizer.json (a text in, the ids the model reads out: the
adapter's template around it, truncated and padded as loraft does) and labels.json, so that
onnxruntime and `tokenizers` alone classify."""

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from .classifier import TextFormat, pool
from .errors import LoraftError
from .files import write_json
from .job import load_merged
from .lora import base_state_dict
from .models import family_of

MODEL_FILE, LABELS_FILE, TOKENIZER_FILE = "model.onnx", "labels.json", "tokenizer.json"
OPSET = 18


class Classifier(nn.Module):
    """The merged model without LoRA wrappers, its adapter's head, and the adapter's pooling."""

    def __init__(self, model: nn.Module, head: nn.Linear, pooling: str):
        super().__init__()
        self.model, self.head, self.pooling = model, head, pooling

    def forward(self, input_ids, attention_mask):
        lengths = attention_mask.sum(-1)  # causal attention: real tokens never see the padding after them
        pooled = pool(self.model.hidden_states(input_ids), lengths, self.pooling)
        return torch.softmax(self.head(pooled).float(), dim=-1)


def classifier(adapter_dir, weights=None) -> tuple[Classifier, object, dict]:
    """(the classifier the ONNX graph computes, its tokenizer, adapter.json)."""
    merged, tokenizer, meta = load_merged(adapter_dir, weights)
    if meta.get("task") != "classification":
        raise LoraftError(f"--format onnx takes classification adapters; {adapter_dir} is not one (try hf or gguf)")
    with torch.device("meta"):
        plain = family_of(merged).model(merged.config)
    plain.load_state_dict(base_state_dict(merged), assign=True)
    head = merged.out_head.copies[meta["name"]]
    return Classifier(plain.eval(), head, meta["pooling"]).eval(), tokenizer, meta


@contextlib.contextmanager
def quiet_exporter():
    """Without the exporter's progress lines and PyTorch-internal warnings, which say nothing about the model."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def write(adapter_dir, folder: Path, dtype: str, weights=None):
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise LoraftError(f"--format onnx needs the export extra ({e}): pip install 'loraft[export]'") from None
    model, tokenizer, meta = classifier(adapter_dir, weights)
    fmt = TextFormat.of_adapter(meta)
    ids = fmt.encode(tokenizer, ["an example text to trace"])[0]
    example = torch.tensor([ids, ids])  # more than one row and token: both axes stay symbolic
    shapes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}}
    with torch.no_grad(), quiet_exporter():
        torch.onnx.export(
            model,
            (example, torch.ones_like(example)),
            str(folder / MODEL_FILE),
            input_names=["input_ids", "attention_mask"],
            output_names=["probabilities"],
            dynamic_shapes=shapes,
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    tok = fmt.as_tokenizers(tokenizer)
    tok.enable_padding(pad_id=tokenizer.pad_id, pad_token=tok.id_to_token(tokenizer.pad_id))
    tok.save(str(folder / TOKENIZER_FILE))
    write_json(folder / LABELS_FILE, {"labels": meta["label_names"], **fmt.as_dict()})
