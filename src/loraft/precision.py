"""bf16 where the hardware runs it natively: frozen weights stored in bf16, matrix products under autocast."""

import torch
from torch import nn


def bf16_supported(device: torch.device | None = None) -> bool:
    device = device or torch.device("cpu")
    if device.type == "cuda":  # earlier GPUs emulate bf16, slowly
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def cast_frozen_weights(model: nn.Module, dtype):
    """Store the frozen base weights in `dtype` (bf16 halves memory traffic); trainable ones and the
    buffers (RoPE tables) keep fp32."""
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(dtype)


def bf16_autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def uses_bf16(model: nn.Module) -> bool:
    return any(p.dtype == torch.bfloat16 for p in model.parameters())
