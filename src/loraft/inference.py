"""A model made faster for passes without gradients: its transformer blocks compiled once, with dynamic
shapes, so that one graph serves every block, batch size and length (batches of one, and each kind of
block, get their own). Adapters may stay unmerged (`serve`): a pass that runs one adapter over the whole
batch runs a graph of that adapter's; passes mixing adapters run eager. In eager mode a third of the
time goes to elementwise chains (RMSNorm's casts, RoPE, SwiGLU) that compiling fuses. Compiling costs
seconds once, so it pays for large inputs (benchmarks/inference_and_peak.py)."""

import torch
from torch import nn

from .lora import AdapterState, adapter_state
from .models import family_of, model_device
from .models.kv_cache import LayerCache
from .quantize import fuse_dequantizing, quantization_of
from .train import check_compiler, compiler_found

COMPILE_FROM_TEXTS = 1000  # where the compiled passes save more than compiling costs (measured, see above)


def compile_for_inference(model: nn.Module, texts: int, asked: bool | None = None) -> bool:
    """Compile each block for passes without gradients, without a KV cache and with one adapter (or none)
    over the whole batch (others, training's, generation's cached steps and batches that mix adapters,
    run eager), or a quantized base's dequantization, for
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
        block.forward = compiled_without_grad(block.forward, adapter_state(model))
    return True


def compiled_without_grad(forward, adapters: AdapterState):
    compiled = torch.compile(forward, dynamic=True)

    def run(*args, **kwargs):
        cached = any(isinstance(a, LayerCache) for a in [*args, *kwargs.values()])
        eager = torch.is_grad_enabled() or cached or adapters.per_row is not None
        return (forward if eager else compiled)(*args, **kwargs)

    return run
