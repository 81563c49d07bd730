"""A language model as a text classifier: pool the final hidden states of each text at one position
(the last real token by default, as in the book), and apply a new head only there."""

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .data.classification import Batch, ClassificationData, Split, collate
from .errors import LoraftError
from .evaluate import classification_metrics
from .lora import add_module_to_save
from .models import model_device
from .precision import bf16_autocast

POOLINGS = ("last", "first", "mean")


def add_classification_head(model: nn.Module, num_classes: int, adapter: str = "default"):
    """A new `out_head` (emb_dim -> num_classes, no bias, like transformers' `score`) for `adapter`,
    trained in full and saved with it; the language-model head stays for the base model."""
    head = nn.Linear(model.config.emb_dim, num_classes, bias=False)
    add_module_to_save(model, "out_head", head, adapter)


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """(batch, tokens, dim) -> (batch, dim) for right-padded rows with `lengths` real tokens.

    Causal attention means real tokens never see the padding after them, so no mask is needed."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if pooling == "last":
        return hidden[rows, lengths.to(hidden.device) - 1]
    if pooling == "first":
        return hidden[:, 0]
    if pooling == "mean":
        mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths.to(hidden.device)[:, None]
        return (hidden * mask[..., None]).sum(1) / lengths.to(hidden.device)[:, None]
    raise LoraftError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")


@dataclass
class TextFormat:
    """How a text becomes the model's input; an adapter records it, and every use applies it alike."""

    template: str = "{text}"  # e.g. "{text}<|im_end|>": a fixed last token to pool at
    max_length: int = 128  # tokens; the text is truncated, the template's own tokens are kept
    pooling: str = "last"
    bos: bool = True  # start with the tokenizer's BOS, if it has one (adapters from before BOS were used: no)

    def __post_init__(self):
        if self.template.count("{text}") != 1:
            raise LoraftError(f"--template must contain {{text}} once, got {self.template!r}")
        if self.pooling not in POOLINGS:
            raise LoraftError(f"unknown pooling {self.pooling!r}; choose one of {POOLINGS}")

    def encode(self, tokenizer, texts: list[str]) -> list[list[int]]:
        before, after = self.template_ids(tokenizer)
        room = self.max_length - len(before) - len(after)
        return [before + ids[:room] + after for ids in tokenizer.encode_batch(texts)]

    def template_ids(self, tokenizer) -> tuple[list[int], list[int]]:
        """The token ids every text gets before it (BOS, the template's prefix) and after it."""
        prefix, suffix = self.template.split("{text}")
        start = tokenizer.bos_prefix if self.bos else []
        if start and self.pooling == "first":
            raise LoraftError(
                "--pooling first would pool at the BOS token this tokenizer puts first, the same for every text; "
                "use last or mean"
            )
        before = start + (tokenizer.encode(prefix) if prefix else [])
        after = tokenizer.encode(suffix) if suffix else []
        if self.max_length - len(before) - len(after) < 1:
            raise LoraftError(f"--max-length {self.max_length} leaves no room for the text beside the template")
        return before, after

    def as_tokenizers(self, tokenizer):
        """A `tokenizers` Tokenizer that encodes a text as `encode` does, for a runtime without loraft:
        the template's ids added around the text's own and the text alone truncated, as special tokens
        added by a post-processor are."""
        from tokenizers import processors

        tok = tokenizer.as_tokenizers()
        before, after = self.template_ids(tokenizer)
        parts = [("loraft_before", before), ("$A", None), ("loraft_after", after)]
        parts = [(name, ids) for name, ids in parts if ids != []]
        special = [{"id": name, "ids": ids, "tokens": [tok.id_to_token(i) for i in ids]} for name, ids in parts if ids]
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(name for name, _ in parts), special_tokens=special
        )
        tok.enable_truncation(self.max_length)
        return tok

    @classmethod
    def of_adapter(cls, meta: dict) -> "TextFormat":
        """The format an adapter was trained with, from its adapter.json."""
        return cls(meta.get("template", "{text}"), meta["max_length"], meta["pooling"], meta.get("bos", False))

    def as_dict(self) -> dict:
        return {"template": self.template, "max_length": self.max_length, "pooling": self.pooling, "bos": self.bos}


def classify_logits(model: nn.Module, batch: Batch, pooling: str = "last") -> torch.Tensor:
    device = model_device(model)
    hidden = model.hidden_states(batch.input_ids.to(device))
    return model.out_head(pool(hidden, batch.lengths, pooling)).float()


@torch.no_grad()
def predict_proba(model, tokenizer, texts: list[str], fmt: TextFormat, batch_size: int = 32, autocast: bool = False):
    """Class probabilities (len(texts), num_classes), batched by length to pad little."""
    token_lists = fmt.encode(tokenizer, texts)
    order = sorted(range(len(texts)), key=lambda i: len(token_lists[i]))
    probs = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = collate([token_lists[i] for i in rows], [0] * len(rows), tokenizer.pad_id, fmt.max_length)
        with bf16_autocast(model_device(model), autocast):
            logits = classify_logits(model, batch, fmt.pooling)
        for i, p in zip(rows, torch.softmax(logits, -1).cpu()):
            probs[i] = p
    return torch.stack(probs) if probs else torch.empty(0)


def length_bucketed_batches(lengths: list[int], batch_size: int, rng: np.random.Generator, pool_batches: int = 16):
    """Random batches of similar lengths: shuffle, sort each pool of `pool_batches` batches by length,
    cut it into batches, shuffle the batches. Little padding, and the order stays random."""
    order = rng.permutation(len(lengths))
    batches = []
    pool_size = batch_size * pool_batches
    for start in range(0, len(order), pool_size):
        pool_rows = sorted(order[start : start + pool_size], key=lambda i: lengths[i])
        batches += [pool_rows[i : i + batch_size] for i in range(0, len(pool_rows), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def epoch_batches(token_lists: list, batch_size: int, seed: list[int], make_batch) -> list:
    """An epoch's training batches: `make_batch(row indices)` of each group of length_bucketed_batches,
    shuffled by `seed` (the run's seed and the epoch)."""
    rows = length_bucketed_batches([len(t) for t in token_lists], batch_size, np.random.default_rng(seed))
    return [make_batch(r) for r in rows]


class ClassificationTask:
    """Training batches, loss and validation metrics for `Trainer`."""

    best_metric = "accuracy"

    def __init__(self, tokenizer, data: ClassificationData, fmt: TextFormat, seed: int, autocast: bool):
        self.tokenizer, self.data, self.fmt, self.seed, self.autocast = tokenizer, data, fmt, seed, autocast
        self.train_tokens = fmt.encode(tokenizer, data.train.texts)

    def train_batches(self, epoch: int, batch_size: int) -> list[Batch]:
        def batch(rows):
            labels = [self.data.train.labels[i] for i in rows]
            return collate([self.train_tokens[i] for i in rows], labels, self.tokenizer.pad_id, self.fmt.max_length)

        return epoch_batches(self.train_tokens, batch_size, [self.seed, epoch], batch)

    def loss(self, model, batch: Batch):
        logits = classify_logits(model, batch, self.fmt.pooling)
        labels = batch.labels.to(logits.device)
        loss = nn.functional.cross_entropy(logits, labels)
        return loss, {"correct": int((logits.argmax(-1) == labels).sum()), "count": len(labels)}

    def evaluate(self, model) -> dict:
        return evaluate_split(model, self.tokenizer, self.data.val, self.data.label_names, self.fmt, self.autocast)

    def batch_tokens(self, batch: Batch) -> int:
        return int(batch.lengths.sum())


def evaluate_split(model, tokenizer, split: Split, label_names, fmt: TextFormat, autocast=False) -> dict:
    was_training = model.training
    model.eval()
    probs = predict_proba(model, tokenizer, split.texts, fmt, autocast=autocast)
    model.train(was_training)
    loss = (
        nn.functional.nll_loss(probs.clamp_min(1e-12).log(), torch.tensor(split.labels)).item() if len(split) else 0.0
    )
    return {"loss": loss, **classification_metrics(split.labels, probs.argmax(-1).tolist(), label_names)}
