"""The fine-tuning jobs, from data to a tested, saved adapter: text classification (the SMS spam
classifier is the default) with LoRA or one of the book's baselines."""

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from . import lora
from .adapters import load_adapter, read_adapter, save_adapter
from .classifier import ClassificationTask, TextFormat, add_classification_head, evaluate_split
from .data.classification import ClassificationData, load_classification_data
from .data.sms_spam import load_sms_spam
from .errors import LoraftError
from .files import read_json, write_json
from .models import DEFAULT_MODEL, load_model
from .plots import plot_run
from .precision import bf16_supported, cast_frozen_weights
from .run_folder import claimed
from .train import TrainConfig, Trainer, check_config, pick_device

METHODS = ("lora", "full", "last-block", "last-two-blocks", "head")


def load_data(
    data: str, data_file=None, text_column="text", label_column="label", val_file=None, test_file=None, seed=123
) -> ClassificationData:
    if data == "sms-spam":
        return load_sms_spam(data_file)
    return load_classification_data(data, text_column, label_column, val_file, test_file, seed)


def prepare_model(model: nn.Module, method: str, num_classes: int, rank, alpha, targets, scaling, dropout):
    """Make `method`'s parameters the trainable ones: LoRA matrices, or (baselines) base blocks."""
    if method not in METHODS:
        raise LoraftError(f"unknown --method {method!r}; choose one of {METHODS}")
    if method == "lora":
        lora.apply_lora(model, rank, alpha, targets, scaling, dropout)
    add_classification_head(model, num_classes)
    trained_blocks = {"full": len(model.trf_blocks), "last-block": 1, "last-two-blocks": 2}.get(method, 0)
    if trained_blocks:
        chosen = [model.trf_blocks[-i] for i in range(1, trained_blocks + 1)] + [model.final_norm]
        if method == "full":
            chosen = [model]
        for module in chosen:
            for param in module.parameters():
                param.requires_grad_(True)
        for name, param in model.named_parameters():  # a tied head is listed once, as the embedding
            if name.startswith("out_head.original."):  # the LM head: a classifier never runs it
                param.requires_grad_(False)
    lora.adapter_state(model).configs["default"]["trained_parameters"] = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and "lora_" not in name and ".copies." not in name
    ]


def resolved_config(train: TrainConfig | None) -> TrainConfig:
    """A copy of `train` (or the defaults) with the device it runs on and bf16 where that device has
    it: what config.json records, so that --resume on another device is refused, not silently inexact."""
    cfg = replace(train or TrainConfig())
    device = pick_device(cfg.device)
    cfg.device, cfg.bf16 = str(device), cfg.bf16 and bf16_supported(device)
    check_config(cfg)
    return cfg


def train_classifier(
    out="runs/sms-spam",
    model=DEFAULT_MODEL,
    weights=None,
    data="sms-spam",
    data_file=None,
    text_column="text",
    label_column="label",
    val_file=None,
    test_file=None,
    method="lora",
    rank=16,
    alpha=16.0,
    scaling="standard",
    targets=("all-linear",),
    dropout=0.0,
    max_length=128,
    pooling="last",
    template="{text}",
    resume=False,
    overwrite=False,
    quiet=False,
    train: TrainConfig | None = None,
) -> dict:
    """Fine-tune `model` into a classifier of `data`; write the adapter, metrics, report and plots to `out`."""
    options = {k: v for k, v in locals().items() if k != "train"}
    cfg = resolved_config(train)
    fmt = TextFormat(template, max_length, pooling)
    out = Path(out)
    config = json.loads(json.dumps({**options, "targets": list(targets), "train": asdict(cfg)}, default=str))
    dataset = load_data(data, data_file, text_column, label_column, val_file, test_file, cfg.seed)
    with claimed(out, config, resume, overwrite) as main:
        quiet = quiet or not main
        started = time.perf_counter()
        base, tokenizer = load_model(model, weights)
        if max_length > base.context_length:
            raise LoraftError(f"--max-length {max_length} exceeds {model}'s context length {base.context_length}")
        torch.manual_seed(cfg.seed)  # the new head and the LoRA A matrices start from it
        prepare_model(base, method, len(dataset.label_names), rank, alpha, list(targets), scaling, dropout)
        base.to(cfg.device)
        if cfg.bf16 and method in ("lora", "head"):
            cast_frozen_weights(base, torch.bfloat16)
        task = ClassificationTask(tokenizer, dataset, fmt, cfg.seed, cfg.bf16)
        adapter_meta = dict(
            task="classification", label_names=dataset.label_names, **fmt.as_dict(), method=method, seed=cfg.seed
        )
        out.mkdir(parents=True, exist_ok=True)
        if main:
            write_json(out / "config.json", config)

        def evaluate(split):
            return evaluate_split(base, tokenizer, split, dataset.label_names, fmt, cfg.bf16)

        before_file = out / "before.json"
        if resume and before_file.is_file():
            before = read_json(before_file)
        elif main:
            before = {name: evaluate(getattr(dataset, name))["accuracy"] for name in ("val", "test")}
            write_json(before_file, before)

        trainer = Trainer(
            base, task, cfg, out, on_best=lambda m: save_adapter(m, out / "adapter", **adapter_meta), quiet=quiet
        )
        if not quiet:
            counts = lora.parameter_summary(base)
            print(
                f"{model}: {counts['trainable']:,} of {counts['total']:,} parameters trainable ({method}); "
                f"data {dataset.sizes()}; accuracy before training: val {before['val']:.3f}, test {before['test']:.3f}"
            )
        state = trainer.run(resume)
        if not main:
            return {}  # process 0 saves the adapter, evaluates and reports
        save_adapter(base, out / "adapter", **adapter_meta)  # the best weights, restored by the trainer
        lora.merge(base)  # faster, and what `loraft classify` and `loraft eval` run
        results = {name: evaluate(getattr(dataset, name)) for name in ("train", "val", "test")}
        report = {
            "model": model,
            "method": method,
            "data": data,
            "sizes": dataset.sizes(),
            "label_names": dataset.label_names,
            "accuracy_before": before,
            **{f"{name}_accuracy": r["accuracy"] for name, r in results.items()},
            "test": results["test"],
            "val": results["val"],
            "best_step": state["best_step"],
            "parameters": lora.parameter_summary(base),
            "adapter_bytes": (out / "adapter" / "adapter.safetensors").stat().st_size,
            "train_seconds": state["train_seconds"],
            "train_tokens_per_second": state["tokens"] / max(state["train_seconds"], 1e-9),
            "wall_seconds": time.perf_counter() - started,
        }
        write_json(out / "report.json", report)
        plots = plot_run(out)
        if not quiet:
            print(
                f"test accuracy {report['test_accuracy']:.4f} (val {report['val_accuracy']:.4f}, train {report['train_accuracy']:.4f}), "
                f"{report['wall_seconds']:.0f} s\nadapter: {out / 'adapter'}\nreport:  {out / 'report.json'}\n"
                f"plots:   {', '.join(str(p) for p in plots)}"
            )
        return report


def load_classifier(adapter_dir, weights=None):
    """(model, tokenizer, adapter metadata) ready to classify, the adapter merged for speed."""
    meta, _ = read_adapter(adapter_dir)
    if meta.get("task") != "classification":
        raise LoraftError(f"{adapter_dir} is not a classification adapter (task {meta.get('task')!r})")
    model, tokenizer = load_model(meta["base_model"], weights)
    load_adapter(model, adapter_dir)
    lora.merge(model)
    if bf16_supported():
        cast_frozen_weights(model, torch.bfloat16)
    return model, tokenizer, meta


def evaluate_adapter(
    adapter_dir, data="sms-spam", data_file=None, text_column="text", label_column="label", split="test", weights=None
) -> dict:
    """Metrics of a classification adapter on a split of `data` (the split it was trained with, when
    the seed is the default) or on all of it."""
    from .data.classification import Split, encode_labels, read_labelled_texts, split_by_fractions
    from .data.sms_spam import book_split, read_sms_spam, sms_spam_file

    meta, _ = read_adapter(adapter_dir)
    names = meta.get("label_names", [])
    if data == "sms-spam":
        texts, labels = read_sms_spam(sms_spam_file(data_file))
        if names != ["ham", "spam"]:
            raise LoraftError(f"{adapter_dir} classifies {names}, not the SMS labels ['ham', 'spam']")
        dataset = book_split(texts, labels)
        whole = Split(texts, labels)
    else:
        texts, raw = read_labelled_texts(data, text_column, label_column)
        whole = Split(texts, encode_labels(data, raw, names))
        parts = split_by_fractions(whole, (0.1, 0.2), meta.get("seed", 123))  # the split the run made
        dataset = ClassificationData(*parts, names)
    chosen = whole if split == "all" else getattr(dataset, split)
    model, tokenizer, meta = load_classifier(adapter_dir, weights)
    return {
        "adapter": str(adapter_dir),
        "data": data,
        "split": split,
        **evaluate_split(model, tokenizer, chosen, names, TextFormat.of_adapter(meta), True),
    }
