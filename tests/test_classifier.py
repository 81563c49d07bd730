import numpy as np
import pytest
import torch

from loraft.classifier import add_classification_head, classify_logits, length_bucketed_batches
from loraft.data.classification import collate

from .helpers import tiny_gpt2, tiny_llama


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("pooling", ["last", "first", "mean"])
def test_padded_batch_equals_each_text_alone(build, pooling):
    model = build()
    add_classification_head(model, 3)
    texts = [[5, 9, 2, 7, 1], [3], [4, 4, 8]]
    batch = collate(texts, [0, 1, 2], pad_id=0, max_length=16)
    together = classify_logits(model, batch, pooling)
    for row, ids in enumerate(texts):
        alone = classify_logits(model, collate([ids], [0], pad_id=0, max_length=16), pooling)
        assert torch.allclose(together[row], alone[0], atol=1e-5)
    assert together.shape == (3, 3)


def test_length_buckets_cover_every_row_once_and_stay_random():
    lengths = list(np.random.default_rng(0).integers(5, 120, size=1045))
    first = length_bucketed_batches(lengths, 8, np.random.default_rng([1, 0]))
    second = length_bucketed_batches(lengths, 8, np.random.default_rng([1, 1]))
    assert sorted(i for b in first for i in b) == list(range(1045))
    assert first != second
    padding = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in first)
    unsorted_padding = sum(
        max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b)
        for b in (list(range(s, min(s + 8, 1045))) for s in range(0, 1045, 8))
    )
    assert padding < unsorted_padding / 4


def test_text_format_truncates_the_text_and_keeps_the_template(smollm2):
    from loraft.classifier import TextFormat
    from loraft.errors import LoraftError

    _, tokenizer = smollm2
    fmt = TextFormat("SMS: {text}<|im_end|>", max_length=8)
    long, short = fmt.encode(tokenizer, ["one two three four five six seven eight nine ten", "hi"])
    prefix = tokenizer.encode("SMS: ")
    assert len(long) == 8 and long[-1] == tokenizer.eos_id and long[: len(prefix)] == prefix
    assert short == tokenizer.encode("SMS: ") + tokenizer.encode("hi") + [tokenizer.eos_id]
    with pytest.raises(LoraftError, match="must contain"):
        TextFormat("no placeholder")
