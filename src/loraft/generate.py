"""Text generation with a KV cache: greedy (temperature 0) or sampled with temperature and top-k."""

from collections.abc import Iterator

import torch
from torch import nn

from .errors import LoraftError
from .models import model_device


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


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    if top_k:
        kth_best = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generate(model, prompt_ids: list[int], max_new_tokens: int, **sampling) -> list[int]:
    return list(stream_tokens(model, prompt_ids, max_new_tokens, **sampling))
