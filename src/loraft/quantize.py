"""A frozen base in fewer bits (QLoRA): each linear layer of the transformer blocks keeps its weight
quantized and dequantizes it inside its own forward and backward only, so while it trains or runs no
full-precision copy of the model exists (int8 and nf4 quantize a model once loaded whole, in the dtype
it trains in; a GGUF's blocks are never expanded); the LoRA matrices and new heads stay fp32 and are
all that trains.

- int8: one absmax scale per output row, W ~ scale * q with q in [-127, 127];
- nf4: QLoRA's NormalFloat4 (Dettmers et al. 2023) as bitsandbytes and torchao store it: blocks of 64
  weights, each normed by its absmax onto the 16 NF4 levels (two codes a byte, the first in the high
  nibble), and the absmaxes double-quantized as torchao does: their mean subtracted, then int8 in
  blocks of 256 with one fp32 factor each;
- gguf: a GGUF file's own blocks, as llama.cpp stores them (models/__init__.py reads them without
  expanding them); Q4_0, Q4_1 and Q8_0 dequantize here in PyTorch, other types through the `gguf` package.

Eager, dequantizing takes one pass over a full-size weight per operation; `fuse_dequantizing` compiles
each format's dequantization into one kernel that reads the codes and writes the weight once.
"""

import functools
import logging

import torch
from torch import nn

from .errors import LoraftError

MODES = ("none", "int8", "nf4", "gguf")

# The 16 NF4 levels: quantiles of a standard normal scaled to [-1, 1], with an exact zero (the QLoRA
# paper's appendix E and bitsandbytes' table).
NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)
NF4_BLOCK, SCALER_BLOCK = 64, 256
BITSANDBYTES_DEVICES = ("cuda", "cpu")  # where nf4 dequantizes with bitsandbytes' kernel, if it is installed
# a byte's two levels, the high nibble's first: dequantizing looks each byte up once
NF4_PAIRS = torch.stack([NF4_LEVELS.repeat_interleave(16), NF4_LEVELS.repeat(16)], dim=1)


class QuantizedWeight(nn.Module):
    """A frozen weight matrix held quantized in buffers; `dequantize` rebuilds it for one use."""

    requires_grad = False
    fused = False  # dequantize in one compiled kernel (fuse_dequantizing)

    def __init__(self, shape: torch.Size):
        super().__init__()
        self.shape = torch.Size(shape)

    def keep(self, name: str, tensor: torch.Tensor):
        """Hold `tensor` as a buffer outside the state dict: the base's weights are the checkpoint's, not ours."""
        self.register_buffer(name, tensor, persistent=False)

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def kernel(self, function):
        """`function`, compiled where this weight is fused."""
        return compiled(function) if self.fused else function

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


class Int8Weight(QuantizedWeight):
    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape)
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.keep("values", torch.round(w / scale[:, None]).to(torch.int8))
        self.keep("scale", scale)

    def dequantize(self, dtype):
        return self.kernel(int8_values)(self.values, self.scale, dtype)


def int8_values(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (values.float() * scale[:, None]).to(dtype)


class NF4Weight(QuantizedWeight):
    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape)
        blocks = weight.detach().float().reshape(-1, NF4_BLOCK)
        absmax = blocks.abs().amax(dim=1)
        normed = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
        midpoints = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
        codes = torch.bucketize(normed, midpoints.to(normed.device)).to(torch.uint8)  # the nearest level
        self.keep("codes", (codes[:, 0::2] << 4) | codes[:, 1::2])
        # double quantization of the absmaxes: int8 per 256, around their mean
        self.keep("absmax_mean", absmax.mean())
        centered = absmax - self.absmax_mean
        padded = nn.functional.pad(centered, (0, -len(centered) % SCALER_BLOCK)).reshape(-1, SCALER_BLOCK)
        factor = 128 / padded.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
        quantized = torch.round(padded * factor[:, None]).clamp(-128, 127).to(torch.int8)
        self.keep("absmax_codes", quantized.flatten()[: len(absmax)])
        self.keep("absmax_factor", factor)

    def absmax(self) -> torch.Tensor:
        return nf4_absmax(self.absmax_codes, self.absmax_factor, self.absmax_mean)

    def dequantize(self, dtype):
        if self.device.type in BITSANDBYTES_DEVICES and bitsandbytes_found():
            return self.bitsandbytes_dequantize(dtype)
        values = self.kernel(nf4_values)(self.codes, self.absmax_codes, self.absmax_factor, self.absmax_mean, dtype)
        return values.view(self.shape)

    def bitsandbytes_dequantize(self, dtype):
        """The same weight from bitsandbytes' own kernel: its 4-bit layout is ours."""
        return torch.ops.bitsandbytes.dequantize_4bit(self.codes, self.absmax(), NF4_BLOCK, "nf4", self.shape, dtype)


def nf4_absmax(codes: torch.Tensor, factor: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return codes.float() / factor.repeat_interleave(SCALER_BLOCK)[: len(codes)] + mean


def nf4_values(codes, absmax_codes, absmax_factor, absmax_mean, dtype: torch.dtype) -> torch.Tensor:
    """(blocks, 64) weights: each byte's two levels times its block's absmax."""
    levels = nn.functional.embedding(codes.int(), NF4_PAIRS.to(codes.device))  # (blocks, 32, 2)
    absmax = nf4_absmax(absmax_codes, absmax_factor, absmax_mean)
    return (levels.view(len(codes), -1) * absmax[:, None]).to(dtype)


@functools.cache
def bitsandbytes_found() -> bool:
    """bitsandbytes imported, which registers its kernels as torch.ops.bitsandbytes."""
    # its CPU backend warns at import when an optional hub kernel for 4-bit products is missing: not one loraft uses
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def fp16_field(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 number at byte `start` of each block, as fp32 (blocks, 1)."""
    return blocks[..., start : start + 2].contiguous().view(torch.float16).float()


def four_bit_codes(quants: torch.Tensor) -> torch.Tensor:
    """A block's 32 four-bit codes: ggml keeps weight j in the low nibble of byte j, weight j + 16 in its
    high nibble."""
    return torch.cat([quants & 15, quants >> 4], dim=-1).float()


def q4_0_values(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (fp16_field(b, 0) * (four_bit_codes(b[..., 2:]) - 8)).to(dtype)


def q4_1_values(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (fp16_field(b, 0) * four_bit_codes(b[..., 4:]) + fp16_field(b, 2)).to(dtype)


def q8_0_values(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (fp16_field(b, 0) * b[..., 2:].contiguous().view(torch.int8).float()).to(dtype)


# ggml's 32-weight blocks: bytes per block, and its values from the (blocks, bytes) raw bytes
GGML_BLOCKS = {"Q4_0": (18, q4_0_values), "Q4_1": (20, q4_1_values), "Q8_0": (34, q8_0_values)}


class GGUFWeight(QuantizedWeight):
    """A weight as a GGUF file stores it: each row its own bytes in the file's quantization type."""

    def __init__(self, rows: torch.Tensor, kind: str, shape):
        super().__init__(shape)
        self.keep("rows", rows)  # (out_features, bytes per row), uint8
        self.kind = kind

    def dequantize(self, dtype):
        if self.kind in GGML_BLOCKS:
            block_bytes, values = GGML_BLOCKS[self.kind]
            return self.kernel(values)(self.rows.view(-1, block_bytes), dtype).reshape(self.shape)
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        dense = dequantize(self.rows.cpu().numpy(), GGMLQuantizationType[self.kind])
        return torch.from_numpy(dense).to(self.rows.device, dtype)


WEIGHTS = {"int8": Int8Weight, "nf4": NF4Weight}


@functools.cache
def compiled(function):
    """One compiled `function` for every weight: dynamic shapes, so every layer's shape shares its kernel."""
    return torch.compile(function, dynamic=True)


def fuse_dequantizing(model: nn.Module):
    """Dequantize each of `model`'s quantized weights in one compiled kernel (the layers themselves stay eager)."""
    for module in model.modules():
        if isinstance(module, QuantizedWeight):
            module.fused = True


class DequantizedMatmul(torch.autograd.Function):
    """x W^T + b for a quantized frozen W: W is dequantized in forward and again in backward, for the
    input's gradient, and never kept between them."""

    @staticmethod
    def forward(ctx, x, weight: QuantizedWeight, bias):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            out = nn.functional.linear(x.to(dtype), weight.dequantize(dtype), None if bias is None else bias.to(dtype))
        ctx.weight, ctx.x_dtype = weight, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        with torch.autocast(grad.device.type, enabled=False):
            return (grad @ ctx.weight.dequantize(grad.dtype)).to(ctx.x_dtype), None, None


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is a QuantizedWeight (its bias, if any, stays as it was)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, mode: str):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.mode = mode

    def forward(self, x):
        return DequantizedMatmul.apply(x, self.weight, self.bias)


def dense_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """A layer's weight as a tensor of `dtype`: quantized ones dequantized, others cast."""
    return weight.dequantize(dtype) if isinstance(weight, QuantizedWeight) else weight.to(dtype)


def check_mode(mode: str):
    if mode not in MODES:
        raise LoraftError(f"unknown --quantize {mode!r}; choose one of {', '.join(MODES)}")


def block_linears(model: nn.Module) -> list[str]:
    """The linear layers of `model`'s transformer blocks: what a quantized base holds in fewer bits (the
    embeddings, final norm and output head stay as they are, as QLoRA leaves them)."""
    return [n for n, m in model.named_modules() if n.startswith("trf_blocks.") and isinstance(m, nn.Linear)]


def quantized_weight(mode: str, name: str, weight: torch.Tensor) -> QuantizedWeight:
    """Layer `name`'s `weight` in int8 or nf4."""
    if mode == "nf4" and weight.numel() % NF4_BLOCK:
        raise LoraftError(f"{name}: {weight.numel()} weights do not fill nf4 blocks of {NF4_BLOCK}")
    return WEIGHTS[mode](weight)


def quantization_of(model: nn.Module) -> str:
    return getattr(model, "quantized", "none")
