"""Hugging Face PEFT adapter folders (adapter_config.json + adapter_model.safetensors), both ways.

PEFT names modules as transformers does (model.layers.0.self_attn.q_proj, transformer.h.0.attn.c_attn)
and scales each LoRA by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), per module through
rank_pattern and alpha_pattern. transformers' GPT-2 computes query, key and value with one fused
c_attn (Phi-3 its q, k, v with one qkv_proj and gate, up with one
gate_up_proj), so our LoRAs on the parts become one there: A stacked, B block-diagonal, which is exact.

Variants: DoRA is PEFT's LoRA with use_dora and a lora_magnitude_vector per module; AdaLoRA is PEFT's
ADALORA type (lora_A, lora_E, lora_B, scaled by lora_alpha / init_r). A PiSSA or OLoRA adapter is saved
by loraft as a plain LoRA already, as is a combined one (`loraft combine`).
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
from .lora import LoraConfig, LoRALinear, adapter_names, add_module_to_save, apply_lora, is_number
from .models import family_named, family_of
from .models.family import Family

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model

HEADS = {"CAUSAL_LM": "lm_head", "SEQ_CLS": "score"}  # the head's name in ...ForCausalLM / ...ForSequenceClassification
PEFT_TYPES = {"LORA": ("lora", "dora"), "ADALORA": ("adalora",)}  # PEFT's type -> our variants

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
    "use_dora",
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
    *("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step"),
}
PEFT_ALPHA = 8  # LoraConfig's lora_alpha when a config leaves it out
ADALORA_DEFAULTS = dict(target_r=8, init_r=12, tinit=0, tfinal=0, deltaT=1, beta1=0.85, beta2=0.85, orth_reg_weight=0.5)
# Other initialisations (pissa, olora, corda, loftq, ...) change the base weights the adapter goes with.
PLAIN_INITS = (True, False, "gaussian")
KEY = re.compile(
    r"base_model\.model\.(?P<module>.+?)\.(?P<part>(lora_[AB]|lora_E|lora_magnitude_vector)(\.weight)?|base_layer\.weight|weight)"
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
    config = LoraConfig.of_adapter(meta)
    if config.variant not in ("lora", "dora", "adalora"):
        raise LoraftError(
            f"adapter {adapter_dir} is a {config.variant!r} LoRA; PEFT export carries lora, dora and adalora"
        )
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

    rank, rslora = config.initial_rank, config.scaling == "rslora"
    # PEFT divides lora_alpha by r (or sqrt(r)); the book's scaling is alpha alone.
    alpha = meta["alpha"] * rank if config.scaling == "book" else meta["alpha"]
    with torch.device("meta"):
        base = family.model(family.config(**meta["base_config"]))
    weights, rank_pattern, alpha_pattern = {}, {}, {}
    for theirs, parts in modules.items():
        chosen = [part for part in parts if part in targets]
        if not chosen:
            continue
        if config.variant == "dora" and len(chosen) < len(parts):
            # DoRA would rescale the fused projection's other rows too, by magnitudes taken from the base
            raise LoraftError(
                f"adapter {adapter_dir}: a DoRA on part of transformers' fused {theirs.rsplit('.', 1)[-1]} "
                f"({', '.join(chosen)}) has no PEFT form; train it with all of {', '.join(parts)} targeted"
            )
        if config.variant == "adalora" and len(chosen) > 1:
            raise LoraftError(
                f"adapter {adapter_dir}: PEFT's AdaLoRA gives transformers' fused {theirs.rsplit('.', 1)[-1]} one "
                f"rank, which cannot hold the {len(chosen)} of {', '.join(chosen)}"
            )
        suffix = "" if config.variant == "adalora" else ".weight"  # as PEFT's AdaLoRA stores its parameters
        weights[f"{PREFIX}{theirs}.lora_A{suffix}"] = torch.cat([tensors[f"{part}.lora_A"] for part in chosen])
        # Rows of a fused projection (GPT-2's c_attn, Phi-3's qkv_proj) whose part has no LoRA stay zero.
        weights[f"{PREFIX}{theirs}.lora_B{suffix}"] = torch.block_diag(
            *[
                tensors[f"{part}.lora_B"] if part in targets else torch.zeros(linear(base, part).out_features, 0)
                for part in parts
            ]
        )
        for extra in ("lora_E", "lora_magnitude_vector"):
            if f"{chosen[0]}.{extra}" in tensors:
                weights[f"{PREFIX}{theirs}.{extra}"] = torch.cat([tensors[f"{part}.{extra}"] for part in chosen])
        if len(chosen) > 1:  # k stacked LoRAs: rank k*r, and alpha grows with it to keep the scale
            rank_pattern[theirs] = rank * len(chosen)
            alpha_pattern[theirs] = alpha * (math.sqrt(len(chosen)) if rslora else len(chosen))
    if heads:
        weights[f"{PREFIX}score.weight"] = tensors["out_head.weight"]

    peft_config = {
        "peft_type": "ADALORA" if config.variant == "adalora" else "LORA",
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
    if config.variant == "dora":
        peft_config["use_dora"] = True
    if config.variant == "adalora":
        # The schedule shapes training only; an adapter that loraft's loop did not train has none, and
        # AdaLoraConfig insists on a valid one: then PEFT's defaults, over one step.
        schedule = {key: meta.get(key) or 0 for key in ("tinit", "tfinal")}
        total_step = meta.get("total_step") or schedule["tinit"] + schedule["tfinal"] + 1
        # r: unused by AdaLoRA, which warns when it is not LoraConfig's default (8)
        peft_config |= dict(r=8, target_r=config.rank, init_r=rank, **schedule)
        peft_config |= dict(deltaT=config.delta_t, beta1=config.beta1, beta2=config.beta2, total_step=total_step)
        peft_config |= dict(orth_reg_weight=config.orth_reg_weight, rank_pattern=None, alpha_pattern={})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(weights, p, metadata={"format": "pt"}))
    write_json(out / CONFIG_FILE, peft_config)
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
    if config.get("peft_type") not in PEFT_TYPES:
        raise LoraftError(
            f"{config_file}: PEFT type {config.get('peft_type')!r} is not supported; loraft reads {', '.join(PEFT_TYPES)} adapters"
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


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


OPTION_KINDS = {  # the options import_peft reads: what each must be, when given
    "lora_alpha": (is_number, "a finite number"),
    "lora_dropout": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "alpha_pattern": (lambda v: isinstance(v, dict) and all(map(is_number, v.values())), "an object of numbers"),
    **{key: (is_count, "a whole number >= 0") for key in ("target_r", "init_r", "tinit", "tfinal", "deltaT")},
    **{key: (is_number, "a finite number") for key in ("beta1", "beta2", "orth_reg_weight")},
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
    """Put the PEFT adapter in `peft_dir` (LoRA, DoRA or AdaLoRA) on `model`, a loraft model of the base
    it was made for, as adapter `name` (active; adapters.save_adapter writes it as a loraft folder).
    Returns its config.

    Each LoRA computes exactly what it does in PEFT. Our adapters have one rank and one scale, so LoRAs
    of a smaller rank (AdaLoRA's pruned ones too) are padded with zeros, and a module's own PEFT scale
    is folded into its B."""
    config, tensors = read_peft(peft_dir)
    if name in adapter_names(model):
        raise LoraftError(f"an adapter named {name!r} is already loaded")
    family = family_of(model)
    task = config.get("task_type") or "CAUSAL_LM"
    modules = module_map(family, model.config.n_layers, HEADS[task])
    adalora, dora = config["peft_type"] == "ADALORA", config["peft_type"] == "LORA" and config.get("use_dora", False)
    needed = {"lora_A", "lora_B", *["lora_E"] * adalora, *["lora_magnitude_vector"] * dora}
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

    ada = {key: config.get(key, value) for key, value in ADALORA_DEFAULTS.items()}
    alpha = config.get("lora_alpha", PEFT_ALPHA)
    planned = {}  # our module -> ({tensor key: tensor}, the PEFT scale)
    for module, lora in loras.items():
        if set(lora) != needed:
            raise LoraftError(f"{peft_dir}: {module} has {sorted(lora)} but needs {', '.join(sorted(needed))}")
        A, B = lora["lora_A"], lora["lora_B"]
        parts = modules[module]
        sizes = [linear(model, part).out_features for part in parts]
        shapes = {"lora_E": (len(A), 1), "lora_magnitude_vector": (sum(sizes),)}
        if (
            A.dim() != 2
            or A.shape[1] != linear(model, parts[0]).in_features
            or B.shape != (sum(sizes), len(A))
            or any(tuple(lora[key].shape) != shape for key, shape in shapes.items() if key in lora)
        ):
            shapes = ", ".join(f"{key} {tuple(t.shape)}" for key, t in sorted(lora.items()))
            raise LoraftError(f"{peft_dir}: the LoRA on {module} ({shapes}) does not fit this model")
        if adalora:  # alpha over the initial rank, as ours
            peft_scale = (alpha if alpha > 0 else ada["init_r"]) / (ada["init_r"] + 1e-5)
        else:
            module_alpha = pattern_value(config.get("alpha_pattern") or {}, module, alpha)
            peft_scale = module_alpha / (math.sqrt(len(A)) if config.get("use_rslora") else len(A))
        magnitudes = lora["lora_magnitude_vector"].split(sizes) if dora else [None] * len(parts)
        for part, B_part, magnitude in zip(parts, B.split(sizes), magnitudes):
            used = slice(None)
            if len(parts) > 1 and B.any():
                # A fused projection: keep the columns this projection's rows use, so that what export_peft
                # stacked comes apart again; a projection that uses none had no LoRA (with DoRA, it keeps
                # its magnitudes).
                used = B_part.any(0)
                if not used.any() and magnitude is None:
                    continue
            part_tensors = {"lora_A": A[used], "lora_B": B_part[:, used]}
            if adalora:
                part_tensors["lora_E"] = lora["lora_E"][used]
            if dora:
                part_tensors["lora_magnitude_vector"] = magnitude
            planned[part] = (part_tensors, peft_scale)
    if not planned:
        raise LoraftError(f"{peft_dir} has no LoRA layers")

    dropout = config.get("lora_dropout", 0.0)
    if adalora:
        lora_config = LoraConfig(
            ada["target_r"],
            alpha if alpha > 0 else ada["init_r"],
            targets=tuple(planned),
            dropout=dropout,
            variant="adalora",
            init_r=ada["init_r"],
            **{key: ada[key] for key in ("tinit", "tfinal", "beta1", "beta2", "orth_reg_weight")},
            delta_t=ada["deltaT"],
        )
    else:
        rank = max(len(part_tensors["lora_A"]) for part_tensors, _ in planned.values())
        scaling = "rslora" if config.get("use_rslora") else "standard"
        variant = "dora" if dora else "lora"
        lora_config = LoraConfig(rank, alpha, scaling, tuple(planned), dropout, variant)
    width = lora_config.initial_rank
    too_wide = [part for part, (t, _) in planned.items() if len(t["lora_A"]) > width]
    if too_wide:
        raise LoraftError(f"{peft_dir}: the AdaLoRA on {too_wide[0]} has a rank above its init_r {width}")
    if head is not None and (head.dim() != 2 or head.shape[1] != model.config.emb_dim):
        raise LoraftError(
            f"{peft_dir}: the score head {tuple(head.shape)} does not fit this model's width {model.config.emb_dim}"
        )

    apply_lora(model, lora_config, name)
    with torch.no_grad():
        for part, (part_tensors, peft_scale) in planned.items():
            module = model.get_submodule(part)
            A, B = part_tensors["lora_A"], part_tensors["lora_B"]
            module.lora_A[name].copy_(nn.functional.pad(A, (0, 0, 0, width - len(A))))
            B = B if peft_scale == lora_config.scale else B * (peft_scale / lora_config.scale)
            module.lora_B[name].copy_(nn.functional.pad(B, (0, width - B.shape[1])))
            if adalora:
                module.lora_E[name].copy_(nn.functional.pad(part_tensors["lora_E"], (0, 0, 0, width - len(A))))
            if dora:
                module.lora_magnitude_vector[name].copy_(part_tensors["lora_magnitude_vector"])
        if head is not None:
            score = nn.Linear(head.shape[1], head.shape[0], bias=False)
            score.weight.copy_(head)
            add_module_to_save(model, "out_head", score, name)
    return config
