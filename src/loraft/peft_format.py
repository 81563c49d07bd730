"""Hugging Face PEFT adapter folders (adapter_config.json + adapter_model.safetensors), both ways.

PEFT names modules as transformers does (model.layers.0.self_attn.q_proj, transformer.h.0.attn.c_attn)
and scales each LoRA by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), per module through
rank_pattern and alpha_pattern. transformers' GPT-2 computes query, key and value with one fused
c_attn (Phi-3 its q, k, v with one qkv_proj and gate, up with one
gate_up_proj), so our LoRAs on the parts become one there: A stacked, B block-diagonal, which is exact.
"""

import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .adapters import check_finite, read_adapter
from .errors import LoraftError
from .files import atomic_write, read_json, read_safetensors, write_json
from .lora import SCALINGS, LoraConfig, LoRALinear, adapter_names, add_module_to_save, apply_lora
from .models import family_named, family_of
from .models.family import Family

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model

HEADS = {"CAUSAL_LM": "lm_head", "SEQ_CLS": "score"}  # the head's name in ...ForCausalLM / ...ForSequenceClassification

# LoraConfig options that do not change what an adapter adds at inference: bookkeeping, and which
# modules were chosen (the weights file says that). Every other option must be unset.
NEUTRAL_OPTIONS = {
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "lora_dropout",
    "fan_in_fan_out",
    "bias",
    "init_lora_weights",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "megatron_core",
    "qalora_group_size",
}
PEFT_ALPHA = 8  # LoraConfig's lora_alpha when a config leaves it out
# Other initialisations (pissa, olora, corda, loftq, ...) change the base weights the adapter goes with.
PLAIN_INITS = (True, False, "gaussian")
KEY = re.compile(
    r"base_model\.model\.(?P<module>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|base_layer\.weight|weight)"
)


def module_map(family: Family, n_layers: int, head: str) -> dict[str, list[str]]:
    """transformers module name -> the names of our modules stacked in its output."""
    names = {
        f"{family.hf_blocks}.{i}.{theirs}": [f"trf_blocks.{i}.{ours}" for ours in parts]
        for i in range(n_layers)
        for theirs, parts in family.hf_modules.items()
    }
    return names | {head: ["out_head"]}


# ---------------------------------------------------------------- loraft -> PEFT


def export_peft(adapter_dir, out_dir) -> Path:
    """Write the loraft adapter in `adapter_dir` as a PEFT adapter folder for the transformers model of
    its base: Llama/GPT2 ...ForCausalLM/LMHeadModel, or ...ForSequenceClassification when the adapter
    trains its own head."""
    meta, tensors = read_adapter(adapter_dir)
    targets, heads = meta["target_modules"], meta["modules_to_save"]
    if not targets:
        raise LoraftError(f"adapter {adapter_dir} has no LoRA layers, which a PEFT LoRA adapter needs")
    if meta.get("variant", "lora") != "lora":
        raise LoraftError(f"adapter {adapter_dir} is a {meta['variant']!r} LoRA; PEFT export carries plain LoRA")
    if meta.get("trained_parameters"):
        raise LoraftError(
            f"adapter {adapter_dir} trains base parameters in place, which a PEFT LoRA adapter cannot carry"
        )
    if set(heads) - {"out_head"}:
        raise LoraftError(
            f"adapter {adapter_dir}: PEFT export takes out_head alone as a trained module, not {sorted(heads)}"
        )
    if heads and (heads["out_head"]["bias"] or "out_head" in targets):
        raise LoraftError(f"adapter {adapter_dir}: transformers' classification head (score) has no bias and no LoRA")
    task = "SEQ_CLS" if heads else "CAUSAL_LM"
    family = family_named(meta["architecture"], str(adapter_dir))
    modules = module_map(family, meta["base_config"]["n_layers"], HEADS[task])
    unmapped = set(targets) - {name for parts in modules.values() for name in parts}
    if unmapped:
        raise LoraftError(f"adapter {adapter_dir}: transformers has no module for the LoRA on {sorted(unmapped)}")

    rank, rslora = meta["rank"], meta["scaling"] == "rslora"
    # PEFT divides lora_alpha by r (or sqrt(r)); the book's scaling is alpha alone.
    alpha = meta["alpha"] * rank if meta["scaling"] == "book" else meta["alpha"]
    with torch.device("meta"):
        base = family.model(family.config(**meta["base_config"]))
    weights, rank_pattern, alpha_pattern = {}, {}, {}
    for theirs, parts in modules.items():
        chosen = [part for part in parts if part in targets]
        if not chosen:
            continue
        weights[f"{PREFIX}{theirs}.lora_A.weight"] = torch.cat([tensors[f"{part}.lora_A"] for part in chosen])
        # Rows of a fused projection (GPT-2's c_attn, Phi-3's qkv_proj) whose part has no LoRA stay zero.
        weights[f"{PREFIX}{theirs}.lora_B.weight"] = torch.block_diag(
            *[
                tensors[f"{part}.lora_B"] if part in targets else torch.zeros(linear(base, part).out_features, 0)
                for part in parts
            ]
        )
        if len(chosen) > 1:  # k stacked LoRAs: rank k*r, and alpha grows with it to keep the scale
            rank_pattern[theirs] = rank * len(chosen)
            alpha_pattern[theirs] = alpha * (math.sqrt(len(chosen)) if rslora else len(chosen))
    if heads:
        weights[f"{PREFIX}score.weight"] = tensors["out_head.weight"]

    config = {
        "peft_type": "LORA",
        "task_type": task,
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": [theirs for theirs, parts in modules.items() if set(parts) & set(targets)],
        "modules_to_save": ["score"] if heads else None,
        "lora_dropout": meta["dropout"],
        "bias": "none",
        "fan_in_fan_out": family.hf_conv1d,
        "inference_mode": True,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(weights, p, metadata={"format": "pt"}))
    write_json(out / CONFIG_FILE, config)
    return out


# ---------------------------------------------------------------- PEFT -> loraft


def read_peft(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and tensors of a PEFT adapter folder, after checking that loraft can run it exactly."""
    folder = Path(folder)
    config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_file.is_file():
        raise LoraftError(f"{folder} is not a PEFT adapter folder (it has no {CONFIG_FILE})")
    if not weights_file.is_file():
        raise LoraftError(f"{folder} has no {WEIGHTS_FILE} (loraft never unpickles adapter_model.bin)")
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise LoraftError(f"{config_file} is not a PEFT adapter config")
    if config.get("peft_type") != "LORA":
        raise LoraftError(
            f"{config_file}: PEFT type {config.get('peft_type')!r} is not supported; loraft reads LoRA adapters"
        )
    if config.get("task_type") not in (None, *HEADS):
        raise LoraftError(
            f"{config_file}: task type {config['task_type']!r} is not supported; loraft reads {list(HEADS)}"
        )
    if config.get("bias", "none") != "none":
        raise LoraftError(f"{config_file}: bias={config['bias']!r} trains biases, which loraft adapters do not")
    if config.get("init_lora_weights", True) not in PLAIN_INITS:
        raise LoraftError(
            f"{config_file}: init_lora_weights={config['init_lora_weights']!r} changes the base weights; "
            "convert the adapter to a plain LoRA with PEFT first"
        )
    for option, value in config.items():
        if option not in NEUTRAL_OPTIONS and value:
            shown = option if option.isprintable() else repr(option)  # a newline in a name: still one line
            raise LoraftError(f"{config_file}: PEFT option {shown}={value!r:.60} is not supported")
    check_options(config, config_file)
    tensors = read_safetensors(weights_file)
    check_finite(tensors, f"{weights_file} cannot be used")
    return config, tensors


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


OPTION_KINDS = {  # the options import_peft reads: what each must be, when given
    "lora_alpha": (is_number, "a finite number"),
    "lora_dropout": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "alpha_pattern": (lambda v: isinstance(v, dict) and all(map(is_number, v.values())), "an object of numbers"),
}


def check_options(config: dict, config_file: Path):
    for option, (fits, kind) in OPTION_KINDS.items():
        if option in config and not fits(config[option]):
            raise LoraftError(f"{config_file}: {option} must be {kind}, not {config[option]!r:.60}")
    for key in config.get("alpha_pattern", {}):
        try:
            re.compile(key)
        except re.error as e:
            raise LoraftError(f"{config_file}: alpha_pattern key {key!r} is not a regular expression ({e})") from None


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern rule: the first key that, as a regex, matches the name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def linear(model: nn.Module, module_name: str) -> nn.Linear:
    module = model.get_submodule(module_name)
    module = module.base if isinstance(module, LoRALinear) else module
    if not isinstance(module, nn.Linear):
        raise LoraftError(f"the adapter has a LoRA on {module_name}, which is not a linear layer in this model")
    return module


def import_peft(peft_dir, model: nn.Module, name: str = "default") -> dict:
    """Put the PEFT LoRA adapter in `peft_dir` on `model`, a loraft model of the base it was made for,
    as adapter `name` (active; adapters.save_adapter writes it as a loraft folder). Returns its config.

    Each LoRA computes exactly what it does in PEFT. Our adapters have one rank and one scale, so LoRAs
    of a smaller rank are padded with zeros, and a module's own PEFT scale is folded into its B."""
    config, tensors = read_peft(peft_dir)
    if name in adapter_names(model):
        raise LoraftError(f"an adapter named {name!r} is already loaded")
    family = family_of(model)
    task = config.get("task_type") or "CAUSAL_LM"
    modules = module_map(family, model.config.n_layers, HEADS[task])
    loras, head = {}, None
    for key, tensor in tensors.items():
        match = KEY.fullmatch(key)
        if match is None:
            raise LoraftError(f"{peft_dir}: tensor {key} is of a kind loraft does not support")
        module, part = match["module"], match["part"]
        if part == "base_layer.weight":
            continue  # PEFT's copy of a targeted head's base weight; ours is the model's own
        if module not in modules:
            raise LoraftError(
                f"{peft_dir}: {module} has no counterpart in this {family.name} model (was the adapter made for another model?)"
            )
        if part != "weight":
            loras.setdefault(module, {})[part.removesuffix(".weight")] = tensor.float()
        elif module == HEADS["SEQ_CLS"]:
            head = tensor.float()
        else:
            raise LoraftError(
                f"{peft_dir}: {module} is trained in full; loraft allows that for a classifier's score head alone"
            )
    if task == "SEQ_CLS" and (head is None or "score" in loras):
        raise LoraftError(
            f"{peft_dir}: a sequence-classification adapter needs its trained score head, and no LoRA on it"
        )

    planned = {}  # our module -> (A, B, the PEFT scale)
    for module, lora in loras.items():
        if set(lora) != {"lora_A", "lora_B"}:
            raise LoraftError(f"{peft_dir}: {module} has {sorted(lora)} but needs lora_A and lora_B")
        A, B = lora["lora_A"], lora["lora_B"]
        parts = modules[module]
        sizes = [linear(model, part).out_features for part in parts]
        if A.dim() != 2 or A.shape[1] != linear(model, parts[0]).in_features or B.shape != (sum(sizes), len(A)):
            shapes = f"A {tuple(A.shape)}, B {tuple(B.shape)}"
            raise LoraftError(f"{peft_dir}: the LoRA on {module} ({shapes}) does not fit this model")
        module_alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", PEFT_ALPHA))
        peft_scale = module_alpha / (math.sqrt(len(A)) if config.get("use_rslora") else len(A))
        for part, B_part in zip(parts, B.split(sizes)):
            A_part, used = A, B_part.any(0)
            if len(parts) > 1 and B.any():
                # A fused projection: keep the columns this projection's rows use, so that what export_peft
                # stacked comes apart again; a projection that uses none had no LoRA.
                if not used.any():
                    continue
                A_part, B_part = A[used], B_part[:, used]
            planned[part] = (A_part, B_part, peft_scale)
    if not planned:
        raise LoraftError(f"{peft_dir} has no LoRA layers")

    rank = max(len(A) for A, _, _ in planned.values())
    scaling, alpha = ("rslora" if config.get("use_rslora") else "standard"), config.get("lora_alpha", PEFT_ALPHA)
    scale = SCALINGS[scaling](alpha, rank)
    if head is not None and (head.dim() != 2 or head.shape[1] != model.config.emb_dim):
        raise LoraftError(
            f"{peft_dir}: the score head {tuple(head.shape)} does not fit this model's width {model.config.emb_dim}"
        )

    apply_lora(model, LoraConfig(rank, alpha, scaling, tuple(planned), config.get("lora_dropout", 0.0)), name)
    with torch.no_grad():
        for part, (A, B, peft_scale) in planned.items():
            module = model.get_submodule(part)
            module.lora_A[name].copy_(nn.functional.pad(A, (0, 0, 0, rank - len(A))))
            B = B if peft_scale == scale else B * (peft_scale / scale)
            module.lora_B[name].copy_(nn.functional.pad(B, (0, rank - B.shape[1])))
        if head is not None:
            score = nn.Linear(head.shape[1], head.shape[0], bias=False)
            score.weight.copy_(head)
            add_module_to_save(model, "out_head", score, name)
    return config
