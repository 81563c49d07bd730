"""Continuous batching's forward passes (generate.DecodeBatch): sequences join a running batch at
different steps, rows of different lengths share one left-padded cache, rows leave; every row's
logits and greedy tokens are those of the same sequence decoded alone, for every family."""

import pytest
import torch

from loraft import lora
from loraft.generate import DecodeBatch, generate, next_token
from loraft.models import load_hf_checkpoint

from ..helpers import randomise, tiny_gpt2
from .checkpoints import REAL, hf_checkpoint

# (prompt, the step at which it joins, new tokens): lengths 3, 11 and 6, so every row is padded at some
# step and Gemma's windows (3 and 4 tokens) slide inside each row.
SEQUENCES = [([5, 17, 42], 0, 9), ([7, 99, 3, 250, 12, 8, 61, 5, 33, 2, 90], 2, 6), ([1, 2, 3, 4, 5, 6], 3, 7)]


def decode_together(model, sequences, per_row=None):
    """Greedy tokens of each sequence and the logits each got, with joins and leaves as scheduled."""
    batch, running, tokens, logits = DecodeBatch(model), [], {i: [] for i in range(len(sequences))}, {}
    logits = {i: [] for i in range(len(sequences))}
    step = 0
    while step == 0 or running:
        if per_row is not None:
            lora.set_per_row(model, [per_row[i] for i in running])
        if running:
            out = batch.step([tokens[i][-1] for i in running])
            for row, i in enumerate(running):
                logits[i].append(out[row])
                tokens[i].append(next_token(out[row], 0, None, None))
        for i, (prompt, joins_at, _) in enumerate(sequences):
            if joins_at == step:
                if per_row is not None:
                    lora.set_per_row(model, [per_row[i]])
                first = batch.join(prompt)
                logits[i].append(first)
                tokens[i].append(next_token(first, 0, None, None))
                running.append(i)
        done = [i for i in running if len(tokens[i]) == sequences[i][2]]
        batch.keep([row for row, i in enumerate(running) if i not in done])
        running = [i for i in running if i not in done]
        step += 1
    return tokens, logits


def alone(model, prompt, n, per_row=None):
    """Logits of each step of `prompt` decoded alone with its cache, and the greedy tokens."""
    if per_row is not None:
        lora.set_per_row(model, per_row)
    tokens = generate(model, prompt, n)
    cache = model.new_cache()
    with torch.no_grad():
        steps = [model(torch.tensor([prompt]), cache)[0, -1]]
        for token in tokens[:-1]:
            steps.append(model(torch.tensor([[token]]), cache)[0, -1])
    return tokens, steps


def assert_each_row_as_alone(model, per_row=None):
    tokens, logits = decode_together(model, SEQUENCES, per_row)
    for i, (prompt, _, n) in enumerate(SEQUENCES):
        expected_tokens, expected_logits = alone(model, prompt, n, per_row and per_row[i : i + 1])
        assert tokens[i] == expected_tokens, i
        for got, expected in zip(logits[i], expected_logits):
            torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", REAL)
def test_rows_of_a_running_batch_decode_as_each_alone(tmp_path, name):
    """RoPE at each row's own positions (Phi's partial rotary, Llama 3's scaling), Gemma's sliding
    windows of 4 and 3 tokens, grouped-query attention, BLOOM's ALiBi."""
    hf_checkpoint(tmp_path, name)
    assert_each_row_as_alone(load_hf_checkpoint(tmp_path).eval())


def test_gpt2_rows_decode_as_each_alone_with_their_learned_positions():
    assert_each_row_as_alone(tiny_gpt2())


def test_rows_through_different_adapters_decode_as_each_alone():
    """Per-row LoRA routing in the same batch: two adapters and the base model."""
    model = tiny_gpt2()
    for seed, name in enumerate(("a", "b")):
        lora.apply_lora(model, rank=4, name=name)  # the new adapter alone is trainable
        randomise(model, seed, std=0.3)
    model.requires_grad_(False)
    assert_each_row_as_alone(model, per_row=["a", None, "b"])
    lora.set_per_row(model, ["a"])
    with_a = generate(model, SEQUENCES[0][0], 9)
    lora.set_per_row(model, [None])
    assert with_a != generate(model, SEQUENCES[0][0], 9)  # the adapters change the answers


def test_a_batch_left_with_one_row_has_no_padding():
    """Once the rows that padded it have left, a row decodes exactly as alone: no mask at all."""
    model = tiny_gpt2()
    batch = DecodeBatch(model)
    batch.join([1, 2, 3])
    batch.join([4, 5, 6, 7, 8])
    assert batch.cache[0].padding.tolist() == [2, 0]
    batch.keep([0])
    assert batch.cache[0].padding is None and batch.cache[0].length == 3
    batch.keep([])
    assert batch.rows == 0 and batch.cache is None
