"""`loraft combine`: one adapter from several trained on the same base for the same task, by the
definitions of PEFT's add_weighted_adapter, so that results compare with PEFT's:

- `cat`: the LoRAs side by side, A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...] (the ranks
  add up): exactly the weighted sum of the adapters' updates, sum_i w_i s_i B_i A_i.
- `linear`, `ties`, `dare_linear`, `dare_ties`: the A's and the B's merged apart, each weighted by
  sqrt(|w_i s_i|) (the sign on A): linear sums them (so the product has cross terms B_i A_j: an
  approximation, which `cat` is not); TIES keeps each tensor's largest `density` of entries, elects
  a sign per entry and averages those that agree; DARE keeps a random `density` of entries, rescaled
  by 1 / density (seeded), then sums them (dare_linear) or goes on as TIES does (dare_ties). All
  adapters must have the same rank.
- `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`: the same merges of the updates themselves,
  w_i s_i B_i A_i per layer, then cut back to a rank (--rank; default the largest) by SVD.

The combined adapter's scale is 1 (rank r, alpha r, standard scaling). Heads (a classifier's) are not
LoRAs and cannot be merged: the first adapter's is kept.
"""

import math
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .adapters import read_adapter, write_adapter
from .errors import LoraftError
from .files import atomic_folder, check_new_folder
from .lora import LoraConfig
from .models import family_named


def task_arithmetic(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (tensors * weights).sum(dim=0)


def ties(tensors: torch.Tensor, weights: torch.Tensor, density: float) -> torch.Tensor:
    return disjoint_merge(torch.stack([magnitude_pruned(t, density) for t in tensors]), weights)


def dare_linear(tensors: torch.Tensor, weights: torch.Tensor, density: float) -> torch.Tensor:
    return task_arithmetic(torch.stack([randomly_pruned(t, density) for t in tensors]), weights)


def dare_ties(tensors: torch.Tensor, weights: torch.Tensor, density: float) -> torch.Tensor:
    return disjoint_merge(torch.stack([randomly_pruned(t, density) for t in tensors]), weights)


def magnitude_pruned(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """The tensor with all but its int(density * size) largest entries (by magnitude) zeroed."""
    if density >= 1:
        return tensor
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    mask[tensor.abs().flatten().topk(int(density * tensor.numel())).indices] = 1
    return tensor * mask.view(tensor.shape)


def randomly_pruned(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: each entry kept with probability `density` (torch's global generator) and scaled by 1 / density."""
    if density >= 1:
        return tensor
    return tensor * torch.bernoulli(torch.full_like(tensor, density)) / density


def disjoint_merge(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TIES' sign election and merge: per entry, the sign of the (unweighted) sum wins, and the weighted
    entries of that sign are averaged."""
    agree = tensors.sign() == torch.where(tensors.sum(dim=0) >= 0, 1.0, -1.0)
    return (tensors * weights * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


MERGES = {"linear": task_arithmetic, "ties": ties, "dare_linear": dare_linear, "dare_ties": dare_ties}
READING = ("template", "pooling", "max_length", "bos")  # how a task's texts become its tokens (adapter.json)
METHODS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties", "dare_ties_svd")
PRUNING = ("ties", "dare_linear", "dare_ties")


def merge(method: str, tensors: list[torch.Tensor], weights: list[float], density: float | None) -> torch.Tensor:
    stacked = torch.stack(tensors)
    weights = torch.tensor(weights, dtype=stacked.dtype).view(-1, *[1] * (stacked.dim() - 1))
    function = MERGES[method]
    return function(stacked, weights) if method == "linear" else function(stacked, weights, density)


def check_inputs(adapters: list, weights: list[float], method: str, density: float | None, metas: list[dict]):
    """One line for each way the adapters cannot be combined, before anything is computed."""
    if method not in METHODS:
        raise LoraftError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if len(weights) != len(adapters):
        raise LoraftError(
            f"--weights gives {len(weights)} weights for {len(adapters)} adapters: give one per --adapter"
        )
    if not all(math.isfinite(w) for w in weights):
        raise LoraftError("--weights must be finite numbers")
    prunes = method.removesuffix("_svd") in PRUNING
    if prunes and (density is None or not 0 < density <= 1):
        raise LoraftError(f"--method {method} keeps a fraction of each tensor: give --density in (0, 1]")
    if not prunes and density is not None:
        raise LoraftError(f"--density is for ties and dare methods, not --method {method}")
    first, first_dir = metas[0], adapters[0]
    for meta, folder in zip(metas, adapters):
        if meta["architecture"] != first["architecture"] or meta["base_fingerprint"] != first["base_fingerprint"]:
            raise LoraftError(
                f"{folder} was trained on {meta['base_model']} (fingerprint {meta['base_fingerprint']}), {first_dir} "
                f"on {first['base_model']} ({first['base_fingerprint']}): only adapters of one base combine"
            )
        task = (meta.get("task"), meta.get("label_names"))
        if task != (first.get("task"), first.get("label_names")):
            raise LoraftError(
                f"{folder} is a {describe_task(meta)} adapter, {first_dir} a {describe_task(first)} one: "
                f"only adapters of one task combine"
            )
        reading, first_reading = ({key: m.get(key) for key in READING} for m in (meta, first))
        if reading != first_reading:
            raise LoraftError(
                f"{folder} reads its texts as {reading}, {first_dir} as {first_reading}: "
                "only adapters that read texts alike combine"
            )
        if not meta["target_modules"] or meta.get("trained_parameters"):
            raise LoraftError(f"{folder} is not a LoRA adapter (it trains {meta.get('method', 'no LoRA')})")
        variant = meta.get("variant", "lora")
        if variant != "lora":
            raise LoraftError(f"{folder} is a {variant} adapter; combine merges plain LoRAs (PiSSA, OLoRA included)")
    ranks = {meta["rank"] for meta in metas}
    if method in ("linear", *PRUNING) and len(ranks) > 1:
        raise LoraftError(
            f"--method {method} merges A's and B's of one rank, and these have ranks {sorted(ranks)}: "
            f"use cat or an _svd method"
        )


def describe_task(meta: dict) -> str:
    labels = meta.get("label_names")
    return f"{meta.get('task')}{f' {labels}' if labels else ''}"


def combined_layer(module: str, adapters: list, method: str, density: float | None, rank: int) -> dict:
    """lora_A and lora_B of `module` in the combined adapter, of rank `rank`; `adapters`: (tensors, weight,
    scale) of each adapter that has a LoRA on `module`."""
    As = [tensors[f"{module}.lora_A"] for tensors, _, _ in adapters]
    Bs = [tensors[f"{module}.lora_B"] for tensors, _, _ in adapters]
    if method == "cat":
        A = torch.cat([A * w * s for A, (_, w, s) in zip(As, adapters)])
        B = torch.cat(Bs, dim=1)
    elif method.endswith("svd"):
        updates = [(B @ A) * s for A, B, (_, _, s) in zip(As, Bs, adapters)]
        update = merge(
            method.removesuffix("svd").rstrip("_") or "linear", updates, [w for _, w, _ in adapters], density
        )
        U, S, Vh = torch.linalg.svd(update, full_matrices=False)
        B, A = U[:, :rank] * S[:rank], Vh[:rank]
    else:
        roots = [math.sqrt(abs(w * s)) for _, w, s in adapters]
        signs = [1.0 if w * s >= 0 else -1.0 for _, w, s in adapters]
        A = merge(method, As, [root * sign for root, sign in zip(roots, signs)], density)
        B = merge(method, Bs, roots, density)
    # a smaller rank (an SVD of less, or a layer that some of the adapters lack) is padded with zeros
    return {
        f"{module}.lora_A": nn.functional.pad(A, (0, 0, 0, rank - len(A))).contiguous(),
        f"{module}.lora_B": nn.functional.pad(B, (0, rank - B.shape[1])).contiguous(),
    }


def combine(
    adapters: list,
    weights: list[float],
    method: str,
    out,
    density: float | None = None,
    rank: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the combination of the adapter folders `adapters` to the adapter folder `out`."""
    if not adapters:
        raise LoraftError("give at least one --adapter")
    read = [read_adapter(folder) for folder in adapters]
    metas = [meta for meta, _ in read]
    check_inputs(adapters, weights, method, density, metas)
    if rank is not None and (not method.endswith("svd") or rank < 1):
        raise LoraftError("--rank (at least 1) sets the rank an _svd method cuts back to; other methods keep theirs")
    if len(adapters) == 1:  # as PEFT: one adapter can only be weighted
        method = "linear"
    check_new_folder(out, overwrite, adapters)  # before the work, not after it

    scales = [LoraConfig.of_adapter(meta).scale for meta in metas]
    first = metas[0]
    family = family_named(first["architecture"], str(adapters[0]))
    with torch.device("meta"):
        order = [name for name, _ in family.model(family.config(**first["base_config"])).named_modules()]
    targets = sorted({m for meta in metas for m in meta["target_modules"]}, key=order.index)
    ranks = [meta["rank"] for meta in metas]
    if method == "cat":
        new_rank = sum(ranks)
    elif method.endswith("svd"):
        new_rank = rank or max(ranks)
    else:
        new_rank = ranks[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # DARE's draws, in PEFT's order: layer by layer, A's then B's
        tensors = {}
        for module in targets:
            present = [(t, w, s) for (meta, t), w, s in zip(read, weights, scales) if module in meta["target_modules"]]
            tensors |= combined_layer(module, present, method, density, new_rank)
    heads = first["modules_to_save"]
    tensors |= {key: t for key, t in read[0][1].items() if key.rsplit(".", 1)[0] in heads}
    record = dict(method=method, weights=weights, density=density, seed=seed, adapters=[str(a) for a in adapters])
    dropped = ("converted_from", "total_step", "trained_parameters", *LoraConfig.__dataclass_fields__)
    meta = {key: value for key, value in first.items() if key not in dropped}
    meta |= dict(
        name="combined",
        loraft_version=__version__,
        **LoraConfig(new_rank, float(new_rank), targets=tuple(targets), dropout=first["dropout"]).as_dict(),
        target_modules=targets,
        modules_to_save=heads,
        combined=record,
    )
    return atomic_folder(out, lambda folder: write_adapter(folder, meta, tensors), overwrite, adapters)
