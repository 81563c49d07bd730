"""Text generation with a KV cache: greedy (temperature 0) or sampled with temperature, top-k and
top-p; and the forward passes of continuous batching (`DecodeBatch`)."""

from collections.abc import Iterator

import torch
from torch import nn

from .errors import LoraftError
from .models import model_device
from .models.kv_cache import joined, rows_kept


@torch.no_grad()
def stream_tokens(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    stop_ids: set[int] = frozenset(),
) -> Iterator[int]:
    """Yield new token ids one at a time until `max_new_tokens` or a stop token (not yielded)."""
    if not prompt_ids:
        raise LoraftError("the prompt is empty")
    if len(prompt_ids) + max_new_tokens > model.context_length:
        raise LoraftError(
            f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens ({max_new_tokens}) exceed the model's "
            f"context length ({model.context_length})"
        )
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    device = model_device(model)
    cache = model.new_cache()
    logits = model(torch.tensor([prompt_ids], device=device), cache)[0, -1]
    for _ in range(max_new_tokens):
        token = next_token(logits.float(), temperature, top_k, generator)
        if token in stop_ids:
            return
        yield token
        logits = model(torch.tensor([[token]], device=device), cache)[0, -1]


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None, generator, top_p: float = 1.0) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    if top_k:
        kth_best = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:  # nucleus: the most likely tokens whose probabilities add up to top_p, the one crossing it included
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0))
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generate(model, prompt_ids: list[int], max_new_tokens: int, **sampling) -> list[int]:
    return list(stream_tokens(model, prompt_ids, max_new_tokens, **sampling))


class DecodeBatch:
    """The forward passes of continuous batching: sequences decode together, one token each per step;
    a sequence joins once its prompt has run alone (so its cache and first logits are those of a run
    alone) and leaves when it is done. Their cache is one left-padded batch (see kv_cache.LayerCache),
    so each row's logits are those of the sequence alone, up to the rounding of batched products.
    Which adapter each row runs is the caller's (lora.set_per_row before each call)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.cache = None  # a LayerCache per layer over all rows; None: no rows

    @property
    def rows(self) -> int:
        return 0 if self.cache is None else self.cache[0].keys.shape[0]

    @torch.no_grad()
    def join(self, prompt_ids: list[int]) -> torch.Tensor:
        """Run a new sequence's prompt alone, add it as the last row; the logits of its next token."""
        cache = self.model.new_cache()
        logits = self.model(torch.tensor([prompt_ids], device=model_device(self.model)), cache)[0, -1]
        self.cache = cache if self.cache is None else joined(self.cache, cache)
        return logits

    @torch.no_grad()
    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed each row its next token; the logits of the token after it, (rows, vocab)."""
        ids = torch.tensor(tokens, device=model_device(self.model))[:, None]
        return self.model(ids, self.cache)[:, -1]

    def keep(self, rows: list[int]):
        """Only `rows` go on, in that order."""
        self.cache = rows_kept(self.cache, rows) if rows else None
