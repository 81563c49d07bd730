"""A merged model made faster for passes without gradients: its transformer blocks compiled once, with
dynamic shapes, so that one graph serves every block and every batch size and length. In eager mode
a third of the time goes to elementwise chains (RMSNorm's casts, RoPE, SwiGLU) that compiling fuses.
Compiling costs seconds once, so it pays for large inputs (benchmarks/inference_and_peak.py)."""

import torch
from torch import nn

from .models import family_of, model_device
from .models.kv_cache import LayerCache
from .quantize import fuse_dequantizing, quantization_of
from .train import check_compiler, compiler_found

COMPILE_FROM_TEXTS = 1000  # where the compiled passes save more than compiling costs (measured, see above)


def compile_for_inference(model: nn.Module, texts: int, asked: bool | None = None) -> bool:
    """Compile each block of a merged model for passes without gradients and without a KV cache (others,
    training's and generation's cached steps, run eager), or a quantized base's dequantization, for
    `texts` texts to come; returns whether it did. `asked`: --compile / --no-compile; None: where it
    pays, from COMPILE_FROM_TEXTS texts on a CPU with a C++ compiler, for the families `loraft train`
    compiles there."""
    on_cpu = model_device(model).type == "cpu"
    if asked and on_cpu:
        check_compiler()
    if asked is None:
        asked = texts >= COMPILE_FROM_TEXTS and on_cpu and compiler_found() and family_of(model).compile_on_cpu
    if not asked:
        return False
    if quantization_of(model) != "none":  # a quantized base's adapter runs beside it: the layers stay eager
        fuse_dequantizing(model)
        return True
    for block in model.trf_blocks:
        block.forward = compiled_without_grad(block.forward)
    return True


def compiled_without_grad(forward):
    compiled = torch.compile(forward, dynamic=True)

    def run(*args, **kwargs):
        cached = any(isinstance(a, LayerCache) for a in [*args, *kwargs.values()])
        return (forward if torch.is_grad_enabled() or cached else compiled)(*args, **kwargs)

    return run
