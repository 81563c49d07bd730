"""AdaLoRA's training (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning"), as PEFT's AdaLoraModel and RankAllocator do it. Each layer's update is s P diag(E) Q
(lora.AdaLoRA: P = lora_B, E = lora_E, Q = lora_A); while training, the triplets (a column of P, a
value of E, a row of Q) that matter least are switched off by zeroing their E, down to `target_rank`
per layer on average, and a penalty keeps P and Q near orthogonal.

The schedule (PEFT's): `tinit` steps with every triplet, then the budget of triplets falls on a cubic
curve, re-allocated every `delta_t` steps, until `total_steps - tfinal`, when it reaches its target;
the last `tfinal` steps train the chosen triplets. A triplet's importance is its tensors' sensitivity
|p * grad(p)|, smoothed (beta1) and times its uncertainty (beta2), as exponential moving averages.
"""

import torch
from torch import nn

Triplets = dict[str, tuple[nn.Parameter, nn.Parameter, nn.Parameter]]  # layer -> (A, E, B)


def orthogonality_penalty(triplets: Triplets) -> torch.Tensor:
    """The mean over every Q (lora_A) and P (lora_B) of ||Q Q^T - I||_F and ||P^T P - I||_F."""
    terms = []
    for A, _, B in triplets.values():
        for gram in (A @ A.t(), B.t() @ B):
            terms.append(torch.linalg.matrix_norm(gram - torch.eye(len(gram), device=gram.device)))
    return torch.stack(terms).mean()


class RankAllocator:
    def __init__(self, triplets: Triplets, target_rank: int, total_steps: int, schedule: dict):
        self.triplets, self.total_steps = triplets, total_steps
        self.tinit, self.tfinal, self.delta_t = schedule["tinit"], schedule["tfinal"], schedule["delta_t"]
        self.beta1, self.beta2 = schedule["beta1"], schedule["beta2"]
        self.initial_budget = sum(len(A) for A, _, _ in triplets.values())
        self.target_budget = target_rank * len(triplets)
        self.sensitivity, self.uncertainty = {}, {}  # per tensor, "<layer>.<A|E|B>"
        self.rank_pattern = None  # per layer, which triplets stay: set by each allocation

    def budget(self, step: int) -> tuple[int, bool]:
        """How many triplets may stay after `step`, and whether to allocate them now."""
        if step <= self.tinit:
            return self.initial_budget, False
        if step > self.total_steps - self.tfinal:
            return self.target_budget, True
        left = 1 - (step - self.tinit) / (self.total_steps - self.tfinal - self.tinit)
        budget = int((self.initial_budget - self.target_budget) * left**3 + self.target_budget)
        return budget, step % self.delta_t == 0

    def tensors(self):
        for layer, triplet in self.triplets.items():
            yield from ((f"{layer}.{part}", p) for part, p in zip("AEB", triplet))

    @torch.no_grad()
    def update_importance(self):
        for key, p in self.tensors():
            sensitivity = (p * p.grad).abs()
            smoothed = self.sensitivity.get(key, torch.zeros_like(p))
            smoothed = self.beta1 * smoothed + (1 - self.beta1) * sensitivity
            uncertainty = self.uncertainty.get(key, torch.zeros_like(p))
            self.uncertainty[key] = self.beta2 * uncertainty + (1 - self.beta2) * (sensitivity - smoothed).abs()
            self.sensitivity[key] = smoothed

    def score(self, key: str) -> torch.Tensor:
        return self.sensitivity[key] * self.uncertainty[key]

    @torch.no_grad()
    def allocate(self, budget: int) -> dict[str, list[bool]]:
        """Switch off all but the `budget` most important triplets (those tied at the threshold go too)."""
        scores = {
            layer: self.score(f"{layer}.E").view(-1)
            + (self.score(f"{layer}.A").mean(dim=1) + self.score(f"{layer}.B").mean(dim=0))
            for layer in self.triplets
        }
        threshold = torch.kthvalue(torch.cat(list(scores.values())), self.initial_budget - budget).values.item()
        pattern = {}
        for layer, (_, E, _) in self.triplets.items():
            kept = scores[layer] > threshold
            E.masked_fill_(~kept.view(-1, 1), 0.0)
            pattern[layer] = kept.tolist()
        return pattern

    @torch.no_grad()
    def keep_pattern(self):
        for layer, (_, E, _) in self.triplets.items():
            E.masked_fill_(~torch.tensor(self.rank_pattern[layer], device=E.device).view(-1, 1), 0.0)

    def after_step(self, step: int):
        """After optimizer step `step` (from 0), its gradients still there: PEFT's update_and_allocate."""
        last = self.total_steps - self.tfinal
        if step < last:
            self.update_importance()
            budget, now = self.budget(step)
            if now:
                self.rank_pattern = self.allocate(budget)
        elif step == last:
            self.rank_pattern = self.allocate(self.budget(step)[0])
            self.sensitivity, self.uncertainty = {}, {}
        else:
            self.keep_pattern()

    def state_dict(self) -> dict:
        return {"sensitivity": self.sensitivity, "uncertainty": self.uncertainty, "rank_pattern": self.rank_pattern}

    def load_state_dict(self, state: dict):
        devices = {key: p.device for key, p in self.tensors()}  # a checkpoint is read onto the CPU
        self.sensitivity = {key: t.to(devices[key]) for key, t in state["sensitivity"].items()}
        self.uncertainty = {key: t.to(devices[key]) for key, t in state["uncertainty"].items()}
        self.rank_pattern = state["rank_pattern"]
