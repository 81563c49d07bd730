"""Low-rank adaptation: h = W x + scale * B(A x), with W frozen and only A and B trained.

Several named adapters can live on one base model. Every wrapped module shares one `AdapterState`,
which says which adapter runs (for the whole batch, or per row) and which one is merged into W.
Variants (DoRA, AdaLoRA) change what an adapter adds; inits (PiSSA, OLoRA) where A and B start.
"""

import fnmatch
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .adalora import RankAllocator, orthogonality_penalty
from .errors import LoraftError
from .quantize import QuantizedLinear, QuantizedWeight, dense_weight
from .weights import weights_fingerprint

# The frozen layers a LoRA wraps: a linear layer, or one whose weight is quantized (QLoRA)
LINEAR_LAYERS = (nn.Linear, QuantizedLinear)

SCALINGS = {
    "book": lambda alpha, rank: alpha,  # the book's appendix E
    "standard": lambda alpha, rank: alpha / rank,  # the LoRA paper and PEFT
    "rslora": lambda alpha, rank: alpha / math.sqrt(rank),  # rank-stabilised LoRA
}
# What alpha is multiplied by when the rank doubles and the scale must stay (a PiSSA adapter saved as LoRA)
ALPHA_FOR_TWICE_THE_RANK = {"book": 1.0, "standard": 2.0, "rslora": math.sqrt(2)}

# Target group names understood everywhere a target list is taken: each family's own groups (its
# `lora_targets`), and these aliases of groups, unless the family defines the name itself (BLOOM's
# attention is its fused query_key_value and its output projection); anything else is a glob pattern
# over module names ("trf_blocks.1*.att.*").
ATTENTION = ["q", "k", "v", "o"]
TARGET_ALIASES = {"attention": ATTENTION, "all-linear": ["attention", "mlp"]}

# Where A and B start (PEFT's init_lora_weights): "default" (A as nn.Linear's weight, B = 0),
# "gaussian" (A ~ N(0, 1/r), B = 0), or from the base weight, which they then leave W minus their
# product: "pissa" (its top singular vectors), "pissa-niter-N" (the same by a randomised SVD of N
# iterations, much faster), "olora" (its QR factorisation).
INITS = ("default", "gaussian", "pissa", "pissa-niter-N", "olora")
PISSA_NITER = re.compile(r"pissa-niter-([1-9][0-9]*)")
ADALORA_FIELDS = ("init_r", "tinit", "tfinal", "delta_t", "beta1", "beta2", "orth_reg_weight")


@dataclass(frozen=True)
class LoraConfig:
    """One adapter's LoRA, carried whole from the command line to adapter.json (its keys, as written)."""

    rank: int = 16
    alpha: float = 16.0
    scaling: str = "standard"  # a key of SCALINGS
    targets: tuple[str, ...] = ("all-linear",)  # target groups, aliases or glob patterns over module names
    dropout: float = 0.0
    variant: str = "lora"  # a key of VARIANTS
    init: str = "default"  # one of INITS
    lora_plus_ratio: float = 0.0  # LoRA+: B's learning rate is this many times A's (0: off)
    # AdaLoRA (variant "adalora"), PEFT's AdaLoraConfig; `rank` is its target_r, the average rank it keeps
    init_r: int | None = None  # every layer's rank at the start; None: 1.5 x rank (PEFT's 12 for 8)
    tinit: int | None = None  # steps before ranks are cut; None: 10% of the run's steps
    tfinal: int | None = None  # steps at the end with the final ranks; None: 30% of the run's steps
    delta_t: int = 1  # steps between two allocations
    beta1: float = 0.85  # moving average of a weight's sensitivity
    beta2: float = 0.85  # moving average of its uncertainty
    orth_reg_weight: float = 0.5  # weight of the orthogonality penalty in the loss

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.scaling not in SCALINGS:
            raise LoraftError(f"unknown LoRA scaling {self.scaling!r}; choose one of {list(SCALINGS)}")
        if self.variant not in VARIANTS:
            raise LoraftError(f"unknown LoRA variant {self.variant!r}; choose one of {list(VARIANTS)}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise LoraftError("the LoRA rank must be at least 1")
        if not 0 <= self.dropout < 1:
            raise LoraftError("the LoRA dropout must be in [0, 1)")
        if not math.isfinite(self.alpha):
            raise LoraftError("the LoRA alpha must be a finite number")
        if not isinstance(self.init, str) or self.init not in INITS and not PISSA_NITER.fullmatch(self.init):
            raise LoraftError(f"unknown LoRA init {self.init!r}; choose one of {', '.join(INITS)} (N a whole number)")
        if self.init == "pissa-niter-N":
            raise LoraftError("--init pissa-niter-N takes the number of iterations as N, e.g. pissa-niter-4")
        if not (is_number(self.lora_plus_ratio) and self.lora_plus_ratio >= 0):
            raise LoraftError(f"--lora-plus-ratio must be a number >= 0 (0: off), not {self.lora_plus_ratio!r}")
        if self.changes_base and self.variant != "lora":
            raise LoraftError(
                f"--init {self.init} starts a plain LoRA from the base weight's principal part; it does not go with --variant {self.variant}"
            )
        if self.variant == "adalora":
            self.check_adalora()

    def check_adalora(self):
        if self.scaling != "standard":
            raise LoraftError("AdaLoRA scales by alpha over its initial rank, as PEFT does: use --scaling standard")
        if self.init != "default":
            raise LoraftError("AdaLoRA starts from its own init (PEFT's: E = 0, A and B ~ N(0, 0.02)): drop --init")
        if self.init_r is not None and not isinstance(self.init_r, int) or self.initial_rank <= self.rank:
            raise LoraftError(
                f"AdaLoRA's initial rank (--adalora-init-r, {self.init_r}) must be a whole number above --rank "
                f"({self.rank}), the average rank it keeps"
            )
        steps = {"--adalora-tinit": self.tinit, "--adalora-tfinal": self.tfinal}
        for flag, value in steps.items():
            if value is not None and not (isinstance(value, int) and value >= 0):
                raise LoraftError(f"{flag} must be a whole number of steps >= 0, not {value!r}")
        if not (isinstance(self.delta_t, int) and self.delta_t >= 1):
            raise LoraftError(f"--adalora-delta-t must be a whole number of steps >= 1, not {self.delta_t!r}")
        if not all(is_number(b) and 0 < b < 1 for b in (self.beta1, self.beta2)):
            raise LoraftError("AdaLoRA's beta1 and beta2 must be in (0, 1)")
        if not (is_number(self.orth_reg_weight) and self.orth_reg_weight >= 0):
            raise LoraftError("AdaLoRA's orth_reg_weight must be a number >= 0")

    @property
    def scale(self) -> float:
        if self.variant == "adalora":  # PEFT's AdaLoRA: alpha over the initial rank (plus its 1e-5)
            return self.alpha / (self.initial_rank + 1e-5)
        return SCALINGS[self.scaling](self.alpha, self.rank)

    @property
    def initial_rank(self) -> int:
        """Each layer's rank: AdaLoRA's init_r, which it prunes towards `rank`, or `rank`."""
        if self.variant != "adalora":
            return self.rank
        return self.init_r if self.init_r is not None else self.rank * 3 // 2

    @property
    def changes_base(self) -> bool:
        """Whether the init takes its part out of the base weights (PiSSA, OLoRA)."""
        return self.init == "olora" or self.init.startswith("pissa")

    def as_dict(self) -> dict:
        kept = (
            asdict(self)
            if self.variant == "adalora"
            else {k: v for k, v in asdict(self).items() if k not in ADALORA_FIELDS}
        )
        return {**kept, "targets": list(self.targets)}

    @classmethod
    def of_adapter(cls, meta: dict) -> "LoraConfig":
        """The LoRA of an adapter.json, on the modules it names (older files lack the newer keys: defaults)."""
        keys = [f for f in cls.__dataclass_fields__ if f != "targets"]
        return cls(targets=meta["target_modules"], **{k: meta[k] for k in keys if k in meta})


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class AdapterState:
    active: str | None = None  # the adapter every row uses; None: the base model alone
    per_row: list[str | None] | None = None  # one adapter (or None) per batch row; overrides `active`
    merged: str | None = None  # the adapter folded into the base weights
    row_index: dict[str, torch.Tensor] = field(default_factory=dict)
    configs: dict[str, dict] = field(default_factory=dict)  # per adapter: rank, alpha, targets, ...

    def routes(self):
        """(adapter, rows) pairs the wrapped modules must add; rows None means the whole batch."""
        if self.per_row is not None:
            return list(self.row_index.items())
        return [] if self.active is None else [(self.active, None)]


class LoRA:
    """Plain LoRA, and the seam for its variants: a variant (DoRA, AdaLoRA, ...) subclasses it, overrides
    what it does differently (its tensors and their init, its delta to the layer's output, its merge)
    and gets a line in VARIANTS. Each tensor lives in a ParameterDict of the layer named by its key
    (lora_A["default"]), under which adapter.safetensors stores it too."""

    fused = True  # LoRAProduct computes this variant's forward and backward (s B A x, with `factors`' A and B)

    def shapes(self, base: nn.Linear, config: LoraConfig) -> dict[str, tuple[int, ...]]:
        return {"lora_A": (config.initial_rank, base.in_features), "lora_B": (base.out_features, config.initial_rank)}

    def init(self, layer: "LoRALinear", name: str, config: LoraConfig):
        """B = 0, so that a new adapter leaves the model as it was; A as nn.Linear initialises a weight
        (or as --init says: PiSSA and OLoRA take A and B from W, and W keeps the rest)."""
        if config.changes_base:
            principal_init(layer, name, config)
            return
        if config.init == "gaussian":
            nn.init.normal_(layer.lora_A[name], std=1 / config.rank)
        else:
            nn.init.kaiming_uniform_(layer.lora_A[name], a=math.sqrt(5))
        nn.init.zeros_(layer.lora_B[name])

    def factors(self, layer: "LoRALinear", name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B): the adapter adds scale * B A x."""
        return layer.lora_A[name], layer.lora_B[name]

    def delta(self, layer: "LoRALinear", name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """What adapter `name` adds to the frozen layer's output `base_out` for the input `x`."""
        A, B = self.factors(layer, name)
        x = nn.functional.dropout(x, layer.dropout[name], layer.training)
        # Under autocast the matmuls run in bf16 whatever A and B are stored in (fp32, for AdamW).
        # The scale multiplies the rank-wide A x, not the wider output (LoRAProduct folds it into A).
        return nn.functional.linear(nn.functional.linear(x, A.to(x.dtype)) * layer.scale[name], B.to(x.dtype))

    def merged_weight(self, layer: "LoRALinear", name: str, weight: torch.Tensor) -> torch.Tensor:
        """W with adapter `name` folded in, in fp32 (`weight`: W in fp32)."""
        return weight + self.update(layer, name)

    def unmerged_weight(self, layer: "LoRALinear", name: str, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of merged_weight."""
        return weight - self.update(layer, name)

    def update(self, layer: "LoRALinear", name: str) -> torch.Tensor:
        A, B = self.factors(layer, name)
        return (B.float() @ A.float()) * layer.scale[name]


class DoRA(LoRA):
    """DoRA (Liu et al. 2024; PEFT's use_dora): the updated weight W + s B A split into its direction and
    a trained magnitude m per output channel, W' = m (W + s B A) / ||W + s B A|| (each row's norm). The
    norm is detached from the gradient, as the paper (section 4.3) and PEFT do in training, and m starts
    at ||W||, so a new adapter leaves the model as it was."""

    fused = False  # LoRAProduct computes plain LoRA: measured, a fused DoRA was not faster (README)

    def shapes(self, base, config):
        return {**super().shapes(base, config), "lora_magnitude_vector": (base.out_features,)}

    def init(self, layer, name, config):
        super().init(layer, name, config)
        layer.lora_magnitude_vector[name].copy_(self.weight_norm(layer, name))

    def weight_norm(self, layer: "LoRALinear", name: str) -> torch.Tensor:
        """||W + s B A|| per output channel, in fp32, without gradient."""
        with torch.no_grad():
            weight = dense_weight(layer.base.weight, torch.float32)
            return torch.linalg.vector_norm(weight + self.update(layer, name), dim=1)

    def delta(self, layer, name, x, base_out):
        # PEFT's: (m / norm - 1) W x + (m / norm) s B A x, with dropout on x (W x then computed again)
        factor = (layer.lora_magnitude_vector[name] / self.weight_norm(layer, name)).to(x.dtype)
        if layer.dropout[name] and layer.training:
            x = nn.functional.dropout(x, layer.dropout[name], training=True)
            base_out = nn.functional.linear(x, dense_weight(layer.base.weight, x.dtype))
        elif layer.base.bias is not None:
            base_out = base_out - layer.base.bias.to(base_out.dtype)
        A, B = self.factors(layer, name)
        lora_out = nn.functional.linear(nn.functional.linear(x, A.to(x.dtype)) * layer.scale[name], B.to(x.dtype))
        return (factor - 1) * base_out.to(x.dtype) + factor * lora_out

    def merged_weight(self, layer, name, weight):
        updated = weight + self.update(layer, name)
        norm = torch.linalg.vector_norm(updated, dim=1)
        layer.merged_norm[name] = norm  # unmerging needs it: the merged weight no longer tells it
        return (layer.lora_magnitude_vector[name].float() / norm)[:, None] * updated

    def unmerged_weight(self, layer, name, weight):
        factor = layer.lora_magnitude_vector[name].float() / layer.merged_norm.pop(name)
        return weight / factor[:, None] - self.update(layer, name)


class AdaLoRA(LoRA):
    """AdaLoRA (Zhang et al. 2023; PEFT's AdaLoraConfig): the update in SVD form, s P diag(E) Q with
    P = lora_B, Q = lora_A and the singular values E = lora_E, each layer of rank init_r; training
    (adalora.py) switches the least important triplets off, down to `rank` per layer on average, and
    penalises P and Q for leaving orthogonality. The scale is alpha / init_r, as in PEFT."""

    def shapes(self, base, config):
        return {**super().shapes(base, config), "lora_E": (config.initial_rank, 1)}

    def init(self, layer, name, config):
        nn.init.zeros_(layer.lora_E[name])
        nn.init.normal_(layer.lora_A[name], std=0.02)
        nn.init.normal_(layer.lora_B[name], std=0.02)

    def factors(self, layer, name):
        return layer.lora_A[name] * layer.lora_E[name], layer.lora_B[name]


def principal_init(layer: "LoRALinear", name: str, config: LoraConfig):
    """PiSSA or OLoRA, as PEFT's pissa_init and olora_init: A and B from W's top singular vectors (the
    singular values split as sqrt(S / s) between them) or its QR factorisation, and W keeps W - s B A,
    so that the model is as it was. A0 and B0 stay with the layer: the saved adapter is the one that
    gives the trained model over the untouched W (`saved_adapter`)."""
    weight = layer.base.weight
    if not isinstance(weight, torch.Tensor):
        raise LoraftError(
            f"--init {config.init} takes its part out of the base weights, which a quantized base cannot take; "
            f"train without --quantize"
        )
    W, s, r = weight.detach().float(), layer.scale[name], config.rank
    if r > min(W.shape):
        raise LoraftError(f"--init {config.init}: the rank {r} exceeds this layer's {tuple(W.shape)}")
    if config.init == "olora":
        Q, R = torch.linalg.qr(W)
        A, B = R[:r], Q[:, :r]
    else:
        niter = PISSA_NITER.fullmatch(config.init)
        if niter is None:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
        else:
            U, S, V = torch.svd_lowrank(W, r, niter=int(niter[1]))
            Vh = V.t()
        root = torch.sqrt(S / s)
        A, B = root[:, None] * Vh, U * root[None, :]
    layer.lora_A[name].copy_(A)
    layer.lora_B[name].copy_(B)
    weight.copy_((W - s * B @ A).to(weight.dtype))
    layer.initial[name] = (A.clone(), B.clone())


VARIANTS = {"lora": LoRA(), "dora": DoRA(), "adalora": AdaLoRA()}


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus named low-rank updates (A: rank x in, B: out x rank), each of its variant."""

    def __init__(self, base: nn.Linear, state: AdapterState):
        super().__init__()
        self.base = base
        self.state = state
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scale: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.variant: dict[str, LoRA] = {}
        self.initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (A, B) of an init that changed W
        self.merged_norm: dict[str, torch.Tensor] = {}  # DoRA's norm while merged

    def add_adapter(self, name: str, config: "LoraConfig"):
        variant = VARIANTS[config.variant]
        for key, shape in variant.shapes(self.base, config).items():
            if not hasattr(self, key):
                self.add_module(key, nn.ParameterDict())
            getattr(self, key)[name] = nn.Parameter(torch.empty(shape, device=self.base.weight.device))  # fp32
        self.scale[name], self.dropout[name], self.variant[name] = config.scale, config.dropout, variant
        with torch.no_grad():
            variant.init(self, name, config)

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        """What adapter `name` trains here: what is frozen, saved, loaded and exported derives from it."""
        return {
            key: tensors[name]
            for key, tensors in self.named_children()
            if isinstance(tensors, nn.ParameterDict) and name in tensors
        }

    def routes(self) -> list:
        """(adapter, rows) pairs this layer adds: the state's routes with an adapter here, not merged."""
        return [
            (name, rows) for name, rows in self.state.routes() if name in self.variant and name != self.state.merged
        ]

    def fast_adapter(self) -> str | None:
        """The adapter LoRAProduct can run: the one adapter over the whole batch, of a fused variant, on
        a frozen base."""
        routes = self.routes()
        frozen = not self.base.weight.requires_grad and (self.base.bias is None or not self.base.bias.requires_grad)
        one = len(routes) == 1 and routes[0][1] is None and self.variant[routes[0][0]].fused
        return routes[0][0] if one and frozen else None

    def forward(self, x):
        name = self.fast_adapter()
        if name is not None:
            p = self.dropout[name]
            dropped = nn.functional.dropout(x, p, training=True) if p and self.training else None
            A, B = self.variant[name].factors(self, name)
            return LoRAProduct.apply(x, dropped, [self.scale[name]], self.base.weight, self.base.bias, A, B)[0]
        out = self.base(x)
        for name, rows in self.routes():
            if rows is None:
                out = out + self.variant[name].delta(self, name, x, out).to(out.dtype)
            else:
                rows = rows.to(x.device)
                delta = self.variant[name].delta(self, name, x[rows], out[rows])
                out = out.index_add(0, rows, delta.to(out.dtype))
        return out

    def merged_weight(self, name: str, unmerge: bool = False) -> torch.Tensor:
        with torch.no_grad():
            weight, variant = self.base.weight, self.variant[name]
            fold = variant.unmerged_weight if unmerge else variant.merged_weight
            return fold(self, name, weight.float()).to(weight.dtype)

    def merge(self, name: str, unmerge: bool = False):
        with torch.no_grad():
            self.base.weight.copy_(self.merged_weight(name, unmerge))


class LoRAProduct(torch.autograd.Function):
    """x W_i^T + b_i + s_i (x A_i^T) B_i^T for linear layers i that read the same x (q, k and v; gate
    and up; or one layer), with W_i and b_i frozen; forward and backward written out. About half the
    kernels autograd runs: no graph nodes per cast and scaling, the sums folded into the matrix
    products, and the layers' A products run as one, x [s_1 A_1; s_2 A_2; ...]^T (and so do their
    gradients). `dropped`: the LoRA's input after dropout (one layer only), None without dropout.
    `params`: W, b, A, B of each layer in turn."""

    @staticmethod
    def forward(ctx, x, dropped, scales, *params):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        weights, biases, As, Bs = params[0::4], params[1::4], params[2::4], params[3::4]
        with torch.autocast(device, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            lora_x = x2 if dropped is None else dropped.reshape(x2.shape).to(dtype)
            quantized = [W if isinstance(W, QuantizedWeight) else None for W in weights]
            weights = [dense_weight(W, dtype) for W in weights]
            Bs = [B.to(dtype) for B in Bs]
            scaled_A = concat([(A * scale).to(dtype) for A, scale in zip(As, scales)])
            ax = lora_x @ scaled_A.t()
            ax_parts = ax.split([A.shape[0] for A in As], dim=1)
            outs = []
            for W, b, B, ax_part in zip(weights, biases, Bs, ax_parts):
                out = x2 @ W.t() if b is None else torch.addmm(b.to(dtype), x2, W.t())
                outs.append(out.addmm_(ax_part, B.t()).view(*x.shape[:-1], -1))
        # a quantized W is dequantized again in backward rather than kept
        ctx.save_for_backward(lora_x, scaled_A, ax, *[None if q else W for q, W in zip(quantized, weights)], *Bs)
        ctx.scales, ctx.x_dtype, ctx.has_dropout, ctx.quantized = scales, x.dtype, dropped is not None, quantized
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        lora_x, scaled_A, ax, *saved = ctx.saved_tensors
        n = len(ctx.scales)
        weights, Bs = saved[:n], saved[n:]
        ranks = [B.shape[1] for B in Bs]
        with torch.autocast(lora_x.device.type, enabled=False):
            grads = [g.reshape(-1, g.shape[-1]).to(lora_x.dtype) for g in grad_outs]
            grad_Bs = [(g.t() @ ax_part).float() for g, ax_part in zip(grads, ax.split(ranks, dim=1))]
            grad_ax = concat([g @ B for g, B in zip(grads, Bs)], dim=1)  # unscaled: the scales are in scaled_A
            grad_As = [(part * scale).float() for part, scale in zip((grad_ax.t() @ lora_x).split(ranks), ctx.scales)]
            grad_x = grad_dropped = None
            if ctx.needs_input_grad[0]:  # not for the first block: the frozen embedding needs no gradient
                weights = [W if q is None else q.dequantize(lora_x.dtype) for q, W in zip(ctx.quantized, weights)]
                grad_x = grads[0] @ weights[0]
                for g, W in zip(grads[1:], weights[1:]):
                    grad_x.addmm_(g, W)
                if not ctx.has_dropout:
                    grad_x.addmm_(grad_ax, scaled_A)
                grad_x = grad_x.view(*grad_outs[0].shape[:-1], -1).to(ctx.x_dtype)
            if ctx.has_dropout and ctx.needs_input_grad[1]:
                grad_dropped = (grad_ax @ scaled_A).view(*grad_outs[0].shape[:-1], -1).to(ctx.x_dtype)
        grad_params = []  # per layer, in the order of `params`: none for the frozen W and b
        for grad_A, grad_B in zip(grad_As, grad_Bs):
            grad_params += [None, None, grad_A, grad_B]
        return grad_x, grad_dropped, None, *grad_params


def concat(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """torch.cat, without its copy of a lone tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def shared_input_linears(x: torch.Tensor, *layers: nn.Module) -> list[torch.Tensor]:
    """[layer(x) for layer in layers], for layers that read the same x (q, k and v; gate and up). When
    each is a LoRA layer running one adapter over the whole batch without dropout, one LoRAProduct
    runs them all: their A products become one matrix product."""
    adapters = [layer.fast_adapter() if isinstance(layer, LoRALinear) else None for layer in layers]
    if (
        len(layers) == 1
        or None in adapters
        or any(layer.dropout[name] and layer.training for layer, name in zip(layers, adapters))
    ):
        return [layer(x) for layer in layers]
    params = [
        t
        for layer, name in zip(layers, adapters)
        for t in (layer.base.weight, layer.base.bias, *layer.variant[name].factors(layer, name))
    ]
    return list(LoRAProduct.apply(x, None, [layer.scale[name] for layer, name in zip(layers, adapters)], *params))


class ModuleToSave(nn.Module):
    """A module replaced by a fully trained module per adapter (PEFT's `modules_to_save`), e.g. a new
    classification head; with no adapter active the original module runs."""

    def __init__(self, original: nn.Module, state: AdapterState):
        super().__init__()
        self.original = original
        self.state = state
        self.copies = nn.ModuleDict()

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        return dict(self.copies[name].named_parameters())

    def forward(self, x):
        routes = [(name, rows) for name, rows in self.state.routes() if name in self.copies]
        if self.state.per_row is None:
            return self.copies[routes[0][0]](x) if routes else self.original(x)
        covered = {i for _, rows in routes for i in rows.tolist()}
        base_rows = torch.tensor([i for i in range(x.shape[0]) if i not in covered], dtype=torch.long)
        parts = [(self.copies[name], rows) for name, rows in routes] + [(self.original, base_rows)] * bool(
            len(base_rows)
        )
        outputs = [(module(x[rows.to(x.device)]), rows) for module, rows in parts]
        if len({out.shape[-1] for out, _ in outputs}) > 1:
            raise LoraftError("adapters in one mixed batch must have output heads of the same size")
        result = outputs[0][0].new_empty(x.shape[0], *outputs[0][0].shape[1:])
        for out, rows in outputs:
            result[rows.to(x.device)] = out
        return result


# ---------------------------------------------------------------- applying, selecting, merging


def adapter_state(model: nn.Module) -> AdapterState:
    if not hasattr(model, "adapter_state"):
        model.adapter_state = AdapterState()
    return model.adapter_state


def target_patterns(groups: dict[str, list[str]], target: str) -> list[str]:
    """The glob patterns of one target: a group of the model's family, an alias of groups, or a pattern."""
    if target in groups:
        return groups[target]
    if target in TARGET_ALIASES:
        return [pattern for name in TARGET_ALIASES[target] for pattern in target_patterns(groups, name)]
    return [target]


def expand_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Module names of the nn.Linear layers (or LoRA-wrapped ones) that `targets` select."""
    groups = getattr(model, "lora_targets", {})
    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (*LINEAR_LAYERS, LoRALinear)) and not name.endswith(".base")
    }
    patterns = []
    for target in targets:
        patterns += target_patterns(groups, target)
        if not any(fnmatch.fnmatchcase(name, p) for name in linears for p in target_patterns(groups, target)):
            names = list(dict.fromkeys([*groups, *TARGET_ALIASES]))
            raise LoraftError(f"LoRA target {target!r} matches no linear layer; groups: {names}")
    return [name for name in linears if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def replace_module(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(model: nn.Module, config: LoraConfig | None = None, name: str = "default", **fields) -> list[str]:
    """Add adapter `name` with `config` (or a LoraConfig of `fields`) to the targeted linear layers, make
    it active and the only trainable thing (besides its modules to save). Returns the targeted module names."""
    config = config or LoraConfig(**fields)
    state = adapter_state(model)
    chosen = expand_targets(model, list(config.targets))
    if config.changes_base:
        if adapter_names(model):
            raise LoraftError(
                f"--init {config.init} changes the base weights under every adapter: it must be the model's only "
                f"adapter, and {adapter_names(model)} are loaded"
            )
        base_fingerprint(model)  # of the untouched weights, which its saved adapter goes with
        untie(model, [model.get_submodule(module_name) for module_name in chosen])
    for module_name in chosen:
        module = model.get_submodule(module_name)
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module, state).train(model.training)  # a model in eval mode runs no LoRA dropout
            replace_module(model, module_name, module)
        if name in module.variant:
            raise LoraftError(f"adapter {name!r} already exists on {module_name}")
        module.add_adapter(name, config)
    state.configs[name] = dict(**config.as_dict(), target_modules=chosen, modules_to_save={})
    set_active(model, name)
    mark_trainable(model, name)
    return chosen


def add_module_to_save(model: nn.Module, module_name: str, new: nn.Module, name: str = "default"):
    """Give adapter `name` its own trained `new` in place of `module_name` (e.g. out_head)."""
    if not isinstance(new, nn.Linear):
        raise LoraftError("only nn.Linear modules can be saved with an adapter")
    state = adapter_state(model)
    module = model.get_submodule(module_name)
    if isinstance(module, LoRALinear):
        raise LoraftError(f"{module_name} has a LoRA; a module to save would replace it (choose one of the two)")
    if not isinstance(module, ModuleToSave):
        module = ModuleToSave(module, state)
        replace_module(model, module_name, module)
    module.copies[name] = new.to(next(module.original.parameters()).device)
    set_active(model, name)
    state.configs.setdefault(name, dict(target_modules=[], modules_to_save={}))["modules_to_save"][module_name] = dict(
        in_features=new.in_features, out_features=new.out_features, bias=new.bias is not None
    )
    mark_trainable(model, name)


def adapter_params(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Adapter `name`'s parameters by their key in adapter.safetensors ("<module>.lora_A", "out_head.weight")."""
    params = {}
    for module_name, module in model.named_modules():
        if (
            isinstance(module, LoRALinear)
            and name in module.variant
            or isinstance(module, ModuleToSave)
            and name in module.copies
        ):
            params |= {f"{module_name}.{key}": p for key, p in module.adapter_params(name).items()}
    return params


def saved_adapter(model: nn.Module, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Adapter `name` as it is saved: its config and tensors, for the untouched base. An adapter whose
    init took its part out of the base weights (PiSSA, OLoRA) is converted as PEFT's
    path_initial_model_for_weight_conversion does: a plain LoRA of twice the rank, A' = [A; A0] and
    B' = [B, -B0], whose s B' A' = s B A - s B0 A0 is what training added to the untouched W."""
    config = dict(adapter_state(model).configs[name])
    tensors = {key: p.detach() for key, p in adapter_params(model, name).items()}
    changed = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear) and name in m.initial}
    if changed:
        for module_name, module in changed.items():
            A0, B0 = module.initial[name]
            A, B = tensors[f"{module_name}.lora_A"], tensors[f"{module_name}.lora_B"]
            tensors[f"{module_name}.lora_A"] = torch.cat([A, A0.to(A.device)])
            tensors[f"{module_name}.lora_B"] = torch.cat([B, -B0.to(B.device)], dim=1)
        trained = {key: config[key] for key in ("init", "rank", "alpha")}
        alpha = config["alpha"] * ALPHA_FOR_TWICE_THE_RANK[config["scaling"]]
        config |= dict(rank=2 * config["rank"], alpha=alpha, init="default", converted_from=trained)
    return config, tensors


class AdapterTraining:
    """What training adapter `name` asks of the loop beyond its loss's gradient (train.StepHook): LoRA+'s
    learning rates, and AdaLoRA's orthogonality penalty and rank allocation."""

    def __init__(self, model: nn.Module, name: str = "default"):
        self.model, self.name = model, name
        self.record = adapter_state(model).configs[name]
        self.config = LoraConfig.of_adapter(self.record) if self.record["target_modules"] else None
        self.allocator = None

    def start(self, total_steps: int):
        """Before the first step: AdaLoRA's schedule over the run's `total_steps`, recorded with the adapter."""
        config = self.config
        if config is None or config.variant != "adalora":
            return
        tinit = round(0.1 * total_steps) if config.tinit is None else config.tinit
        tfinal = round(0.3 * total_steps) if config.tfinal is None else config.tfinal
        if tinit >= total_steps - tfinal:
            raise LoraftError(
                f"AdaLoRA's schedule leaves no steps to allocate ranks in: --adalora-tinit {tinit} and "
                f"--adalora-tfinal {tfinal} of {total_steps} steps; lower them or train longer"
            )
        schedule = dict(tinit=tinit, tfinal=tfinal, delta_t=config.delta_t, beta1=config.beta1, beta2=config.beta2)
        self.record |= dict(init_r=config.initial_rank, tinit=tinit, tfinal=tfinal, total_step=total_steps)
        triplets = {
            module_name: (module.lora_A[self.name], module.lora_E[self.name], module.lora_B[self.name])
            for module_name, module in self.model.named_modules()
            if isinstance(module, LoRALinear) and self.name in module.variant
        }
        self.allocator = RankAllocator(triplets, config.rank, total_steps, schedule)

    def param_groups(self, params: dict[str, nn.Parameter], lr: float, weight_decay: float) -> list[dict]:
        """The optimizer's parameter groups. LoRA+ as PEFT's create_loraplus_optimizer: B, and every vector
        (DoRA's magnitudes, biases), learns at ratio x lr, biases without weight decay; the rest at lr."""
        ratio = self.config.lora_plus_ratio if self.config else 0
        if not ratio:
            return [{"params": list(params.values())}]
        groups = {"A": [], "B": [], "B, no decay": []}
        for param_name, param in params.items():
            fast = "lora_B" in param_name or param.ndim == 1
            groups["B, no decay" if fast and "bias" in param_name else "B" if fast else "A"].append(param)
        rates = {"A": (lr, weight_decay), "B": (lr * ratio, weight_decay), "B, no decay": (lr * ratio, 0.0)}
        return [
            {"params": groups[key], "lr": rates[key][0], "weight_decay": rates[key][1], "name": key}
            for key in groups
            if groups[key]
        ]

    def penalty(self) -> torch.Tensor | None:
        if self.allocator is None:
            return None
        return self.config.orth_reg_weight * orthogonality_penalty(self.allocator.triplets)

    def after_step(self, step: int):
        if self.allocator is not None:
            self.allocator.after_step(step)

    def state_dict(self) -> dict:
        return {} if self.allocator is None else self.allocator.state_dict()

    def load_state_dict(self, state: dict):
        if self.allocator is not None:
            self.allocator.load_state_dict(state)


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter's parameters: what is not the base model."""
    return [p for name in adapter_names(model) for p in adapter_params(model, name).values()]


def base_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The base model's parameters, named as they are without the LoRA wrappers, adapters left out."""
    unwrapped = {f"{name}.base": name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    unwrapped |= {f"{name}.original": name for name, m in model.named_modules() if isinstance(m, ModuleToSave)}
    adapters = {id(p) for p in adapter_parameters(model)}
    params = []
    for name, param in model.named_parameters():
        if id(param) not in adapters:
            module, _, leaf = name.rpartition(".")
            params.append((f"{unwrapped.get(module, module)}.{leaf}" if module else leaf, param))
    return params


def base_changed(model: nn.Module) -> bool:
    """Whether an adapter's init took its part out of the base weights (PiSSA, OLoRA): then the base
    alone is not the base model."""
    return any(isinstance(m, LoRALinear) and m.initial for m in model.modules())


def base_fingerprint(model: nn.Module) -> str:
    """The fingerprint of the base's weights (adapters left out), taken once: an init that changes the
    base (PiSSA, OLoRA) takes it before it does, since its saved adapter goes with the untouched weights."""
    if not hasattr(model, "fingerprint"):
        model.fingerprint = weights_fingerprint(base_parameters(model))
    return model.fingerprint


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict (with the merged adapter, if one is), named as without the LoRA
    wrappers: what a checkpoint of the model holds."""
    unwrapped = {f"{name}.base": name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    unwrapped |= {f"{name}.original": name for name, m in model.named_modules() if isinstance(m, ModuleToSave)}
    adapters = {id(p) for p in adapter_parameters(model)}
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in adapters:
            module, _, leaf = name.rpartition(".")
            state[f"{unwrapped.get(module, module)}.{leaf}" if module else leaf] = tensor.detach()
    return state


def adapter_names(model: nn.Module) -> list[str]:
    names = set()
    for module in model.modules():
        if isinstance(module, LoRALinear):
            names.update(module.variant)
        elif isinstance(module, ModuleToSave):
            names.update(module.copies.keys())
    return sorted(names)


def mark_trainable(model: nn.Module, name: str):
    """Freeze everything but adapter `name`'s LoRA matrices and modules to save."""
    trained = {id(p) for p in adapter_params(model, name).values()}
    for param in model.parameters():
        param.requires_grad_(id(param) in trained)


def set_active(model: nn.Module, name: str | None):
    """Run adapter `name` for every row (None: the base model alone, the adapters stay loaded)."""
    state = adapter_state(model)
    if name is not None and name not in adapter_names(model):
        raise LoraftError(f"no adapter named {name!r}; loaded: {adapter_names(model)}")
    if state.merged is not None and name != state.merged:
        raise LoraftError(f"adapter {state.merged!r} is merged into the weights: unmerge it first")
    state.active, state.per_row, state.row_index = name, None, {}


def set_per_row(model: nn.Module, per_row: list[str | None]):
    """Run one adapter (or None, the base) per batch row in the next forward passes. Rows that all run
    one adapter run it as set_active would: over the whole batch, fused (LoRAProduct), no rows indexed."""
    state = adapter_state(model)
    if state.merged is not None:
        raise LoraftError(f"adapter {state.merged!r} is merged into the weights: unmerge it before mixing adapters")
    unknown = {n for n in per_row if n is not None} - set(adapter_names(model))
    if unknown:
        raise LoraftError(f"no adapter named {sorted(unknown)}; loaded: {adapter_names(model)}")
    if len(set(per_row)) == 1:
        state.active, state.per_row, state.row_index = per_row[0], None, {}
        return
    state.per_row = list(per_row)
    state.row_index = {
        name: torch.tensor([i for i, n in enumerate(per_row) if n == name], dtype=torch.long)
        for name in dict.fromkeys(n for n in per_row if n is not None)
    }


def delete_adapter(model: nn.Module, name: str):
    """Take adapter `name` off the model: its LoRA tensors and its modules to save (PEFT's delete_adapter)."""
    state = adapter_state(model)
    if name not in adapter_names(model):
        raise LoraftError(f"no adapter named {name!r}; loaded: {adapter_names(model)}")
    if state.merged == name:
        raise LoraftError(f"adapter {name!r} is merged into the weights: unmerge it first")
    for module in model.modules():
        if isinstance(module, LoRALinear) and name in module.variant:
            for key in module.adapter_params(name):
                del getattr(module, key)[name]
            del module.scale[name], module.dropout[name], module.variant[name]
        elif isinstance(module, ModuleToSave) and name in module.copies:
            del module.copies[name]
    state.configs.pop(name, None)
    if state.active == name or (state.per_row is not None and name in state.per_row):
        state.active, state.per_row, state.row_index = None, None, {}


def merge(model: nn.Module, name: str | None = None):
    """Fold the active adapter (or `name`) into the base weights: inference at the base's speed."""
    state = adapter_state(model)
    name = name or state.active
    if state.merged is not None:
        raise LoraftError(f"adapter {state.merged!r} is already merged")
    layers = [m for m in model.modules() if isinstance(m, LoRALinear) and name in m.variant]
    if any(isinstance(m.base, QuantizedLinear) for m in layers):
        raise LoraftError(
            f"the base model is quantized ({layers[0].base.mode}): an adapter cannot be merged into it; "
            f"load the adapter without --quantize to merge it into the full-precision weights"
        )
    set_active(model, name)
    for module in layers:  # every layer checked before any W changes, as PEFT's safe_merge does
        if not torch.isfinite(module.merged_weight(name)).all():
            raise LoraftError(
                f"merging adapter {name!r} would put NaN or infinite values into the base weights; they are unchanged"
            )
    untie(model, layers)
    for module in layers:
        module.merge(name)
    state.merged = name


def untie(model: nn.Module, modules: list[nn.Module]):
    """Give each of `modules` (linear or LoRA layers) a weight of its own where it shares one (a head tied
    to the embeddings), before its weight changes: the embedding must not change with it."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for module in modules:
        linear = module.base if isinstance(module, LoRALinear) else module
        if uses[id(linear.weight)] > 1:
            linear.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)


def unmerge(model: nn.Module):
    state = adapter_state(model)
    if state.merged is None:
        return
    for module in model.modules():
        if isinstance(module, LoRALinear) and state.merged in module.variant:
            module.merge(state.merged, unmerge=True)
    state.merged = None


def parameter_summary(model: nn.Module) -> dict[str, int]:
    """Parameter counts, a quantized base's weights included."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    quantized = sum(m.weight.shape.numel() for m in model.modules() if isinstance(m, QuantizedLinear))
    total = sum(p.numel() for p in params) + quantized
    return {"total": total, "trainable": trainable, "frozen": total - trainable}
