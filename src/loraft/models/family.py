"""What loraft needs to know about a model architecture, declared once in the architecture's own file."""

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Family:
    name: str  # recorded in adapter.json as "architecture"
    model: type  # the nn.Module, built from `config`
    config: type  # its config dataclass
    # transformers' block list, and per block each module a PEFT LoRA can target -> our modules stacked in
    # its output (GPT-2's fused c_attn holds three)
    hf_blocks: str
    hf_modules: dict[str, list[str]]
    hf_conv1d: bool  # transformers stores the block's linear layers as Conv1D, (in, out): PEFT's fan_in_fan_out
    hf_model_types: tuple[str, ...]  # config.json's "model_type" values this family reads
    config_from_hf: Callable[[dict], object]
    from_hf_state_dict: Callable[[dict[str, torch.Tensor], object], dict[str, torch.Tensor]]
    # The tokenizer that goes with its Hugging Face checkpoints (None: this family's tokenizer comes from
    # a GGUF's metadata only); a GGUF's own tokenizer needs no family.
    hf_tokenizer: Callable[[], object] | None = None
    compile_on_cpu: bool = False  # whether `loraft train` compiles its blocks by default on a CPU
    gguf_architectures: tuple[str, ...] = ()  # GGUF "general.architecture" values this family reads
    config_from_gguf: Callable[[dict, dict[str, torch.Tensor]], object] | None = None  # (metadata, tensors)
    from_gguf_tensors: Callable[[dict[str, torch.Tensor], object], dict[str, torch.Tensor]] | None = None
    # our state dict and config -> a GGUF's (architecture, metadata without the architecture prefix, tensors)
    to_gguf: Callable[[dict[str, torch.Tensor], object], tuple[str, dict, dict[str, torch.Tensor]]] | None = None
    # our state dict and config -> a config.json that config_from_hf reads back, and the tensors of
    # transformers' ...ForCausalLM (its head as lm_head.weight, always)
    to_hf: Callable[[dict[str, torch.Tensor], object], tuple[dict, dict[str, torch.Tensor]]] | None = None
