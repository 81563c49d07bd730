"""Whether DoRA pays for a fused path: training steps of the default spam job's shapes (SmolLM2-135M,
rank 16 on every linear layer + a new head, bf16 frozen base under autocast, batch 8) with DoRA run
by autograd over its written-out delta (lora.DoRA.delta, what loraft does), against DoRA's forward
and backward written out in one autograd Function per layer, as LoRAProduct does plain LoRA's
(`DoRAProduct` below: out = m / ||W + s B A|| * (W + s B A) x + b). Plain LoRA's steps are timed
beside them, for DoRA's cost. The variants alternate step by step over the same batches in one
process, eager (this machine's speed drifts: only side-by-side ratios mean anything).

    LORAFT_DATA_DIR=../shared/data python benchmarks/dora_fused.py [STEPS]

Writes benchmarks/results/dora_fused.json.
"""

import contextlib
import copy
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch

from loraft.classifier import ClassificationTask, TextFormat
from loraft.data.sms_spam import load_sms_spam
from loraft.finetune import prepare_model
from loraft.lora import DoRA, LoraConfig, LoRALinear
from loraft.models import load_model
from loraft.precision import cast_frozen_weights
from loraft.quantize import dense_weight

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 30
WARMUP = 5
OUT = Path(__file__).parent / "results"


class DoRAProduct(torch.autograd.Function):
    """m / n * (x W^T + s (x A^T) B^T) + b with n = ||W + s B A|| per output row (no gradient), W and b
    frozen; the gradients of x, A, B and m written out."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, magnitude, scale):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            W = dense_weight(weight, dtype)
            norm = torch.linalg.vector_norm(W.float() + (B @ A) * scale, dim=1)
            factor = magnitude / norm
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            scaled_A, B_ = (A * scale).to(dtype), B.to(dtype)
            ax = x2 @ scaled_A.t()
            before = (x2 @ W.t()).addmm_(ax, B_.t())  # (W + s B A) x
            out = before * factor.to(dtype)
            if bias is not None:
                out += bias.to(dtype)
        ctx.save_for_backward(x2, W, scaled_A, B_, ax, before, factor, norm)
        ctx.x_shape, ctx.x_dtype, ctx.scale = x.shape, x.dtype, scale
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        x2, W, scaled_A, B, ax, before, factor, norm = ctx.saved_tensors
        with torch.autocast(x2.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(x2.dtype)
            grad_m = (g.float() * before.float()).sum(0) / norm
            g = g * factor.to(g.dtype)
            grad_B = (g.t() @ ax).float()
            grad_ax = g @ B
            grad_A = (grad_ax.t() @ x2).float() * ctx.scale
            grad_x = (g @ W).addmm_(grad_ax, scaled_A).view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, None, None, grad_A, grad_B, grad_m, None


def fused_forward(original):
    def forward(self, x):
        routes = self.routes()
        name = routes[0][0] if len(routes) == 1 and routes[0][1] is None else None
        if name is None or not isinstance(self.variant[name], DoRA) or self.dropout[name]:
            return original(self, x)
        A, B, m = self.lora_A[name], self.lora_B[name], self.lora_magnitude_vector[name]
        return DoRAProduct.apply(x, self.base.weight, self.base.bias, A, B, m, self.scale[name])

    return forward


def check_same_gradients(model, task, batch, fused):
    """The two DoRA paths compute the same gradients, in fp32 (in bf16 both are a few % from fp32's, the
    written-out one closer: it sums the magnitudes' gradients in fp32)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for context in (contextlib.nullcontext, fused):
        with context():
            loss, _ = task.loss(model, batch)
        grads.append(torch.autograd.grad(loss, params))
    for unfused, written_out in zip(*grads):
        assert (unfused - written_out).norm() <= 1e-3 * unfused.norm() + 1e-9, "the fused DoRA is wrong"


def fused():
    return mock.patch.object(LoRALinear, "forward", fused_forward(LoRALinear.forward))


def main():
    data = load_sms_spam()
    base, tokenizer = load_model("smollm2-135m")
    models = {}
    for variant in ("lora", "dora"):
        model = copy.deepcopy(base)
        torch.manual_seed(123)
        prepare_model(model, "lora", 2, LoraConfig(16, 16, "standard", variant=variant))
        models[variant] = model.train()
    with torch.no_grad():  # a trained-looking start for both DoRA paths: B not zero
        for module in models["dora"].modules():
            if isinstance(module, LoRALinear):
                module.lora_B["default"].normal_(std=1e-3)
    task = ClassificationTask(tokenizer, data, TextFormat(), seed=123, autocast=True)
    batches = task.train_batches(0, 8)[: WARMUP + STEPS]
    check_same_gradients(models["dora"], task, batches[0], fused)
    for model in models.values():
        cast_frozen_weights(model, torch.bfloat16)
    optimizers = {
        v: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, fused=True)
        for v, m in models.items()
    }

    def step(variant, batch):
        model = models["dora" if variant.startswith("dora") else "lora"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = task.loss(model, batch)
        loss.backward()
        optimizers[variant.split()[0]].step()
        optimizers[variant.split()[0]].zero_grad(set_to_none=True)
        return loss.item()

    variants = {"lora": contextlib.nullcontext, "dora unfused": contextlib.nullcontext, "dora fused": fused}
    for batch in batches[:WARMUP]:
        for variant, context in variants.items():
            with context():
                step(variant, batch)
    seconds = dict.fromkeys(variants, 0.0)
    for i, batch in enumerate(batches[WARMUP:]):
        order = list(variants)[i % 3 :] + list(variants)[: i % 3]
        for variant in order:
            with variants[variant]():
                started = time.perf_counter()
                step(variant, batch)
                seconds[variant] += time.perf_counter() - started
    ms = {variant: 1000 * s / STEPS for variant, s in seconds.items()}
    result = {
        "benchmark": f"training steps, smollm2-135m, SMS spam, batch 8, r16 all linear + head, bf16 autocast, eager, {STEPS} batches",
        "threads": torch.get_num_threads(),
        "ms_per_step": ms,
        "dora_fused_speedup": ms["dora unfused"] / ms["dora fused"],
        "dora_unfused_vs_lora": ms["dora unfused"] / ms["lora"],
    }
    print(json.dumps(result, indent=2))
    OUT.mkdir(exist_ok=True)
    (OUT / "dora_fused.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
