"""The one skeleton every fine-tuning job runs: claim the run folder, load the base model, prepare what
trains, measure before, train, save the adapter, get it ready for inference, measure after, report and
plot. A task (classification, instruction following) adds only what differs, as a `JobTask`."""

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from . import lora
from .adapters import load_adapter, read_adapter, save_adapter
from .errors import LoraftError
from .files import read_json, write_json
from .models import load_model
from .plots import plot_run
from .precision import bf16_supported
from .quantize import quantization_of
from .run_folder import claimed
from .train import Task, TrainConfig, Trainer, check_config, pick_device


class JobTask(Protocol):
    name: str  # adapter.json's "task"

    def check(self, model: nn.Module, tokenizer): ...  # fail before training if the model cannot do the task

    def prepare(self, model: nn.Module, lora_config: lora.LoraConfig): ...  # adapter "default", trainable

    def casts_base(self) -> bool: ...  # whether the frozen base trains in bf16 (when the run has bf16)

    def trainer_task(self, tokenizer, cfg: TrainConfig) -> Task: ...

    def adapter_meta(self, cfg: TrainConfig) -> dict: ...  # what adapter.json records besides the LoRA

    def measure(self, model, tokenizer, cfg: TrainConfig, before: dict | None) -> dict: ...  # before: None

    def report(self, before: dict, after: dict) -> dict: ...  # the task's part of report.json

    def files(self, before: dict, after: dict) -> dict: ...  # more JSON files for the run folder, by name

    def describe(self, before: dict, after: dict | None) -> str: ...  # one line for the console


def resolved_config(train: TrainConfig | None) -> TrainConfig:
    """A copy of `train` (or the defaults) with the device it runs on and bf16 where that device has
    it: what config.json records, so that --resume on another device is refused, not silently inexact."""
    cfg = replace(train or TrainConfig())
    device = pick_device(cfg.device)
    cfg.device, cfg.bf16 = str(device), cfg.bf16 and bf16_supported(device)
    check_config(cfg)
    return cfg


def ready_for_inference(model: nn.Module, bf16: bool):
    """The one rule for the weights a trained adapter runs with, in the job that measures it and in every
    command that uses it later: the base (every parameter but the adapters') in bf16 where bf16 runs,
    then the active adapter merged into it, unless the base is quantized (the adapter then runs beside it)."""
    if bf16:
        adapters = {id(p) for p in lora.adapter_parameters(model)}
        for param in model.parameters():
            if id(param) not in adapters:
                param.data = param.data.to(torch.bfloat16)
    if quantization_of(model) == "none":
        lora.merge(model)


def load_trained(adapter_dir, task: str | None, weights=None, quantize: str = "none", bf16: bool | None = None):
    """(model, tokenizer, adapter.json) of a trained adapter of `task` (None: any), ready for inference as
    its job was; `quantize`: its base's block layers in int8 or nf4, whatever base it was trained over;
    `bf16`: the base in bf16 (default: where it runs natively), else fp32."""
    meta, _ = read_adapter(adapter_dir)
    if task is not None and meta.get("task") != task:
        raise LoraftError(f"{adapter_dir} is not a {task} adapter (task {meta.get('task')!r})")
    bf16 = bf16_supported() if bf16 is None else bf16
    model, tokenizer = load_model(meta["base_model"], weights, torch.bfloat16 if bf16 else torch.float32, quantize)
    load_adapter(model, adapter_dir)
    ready_for_inference(model, bf16)
    return model, tokenizer, meta


def load_merged(adapter_dir, weights=None):
    """(model, tokenizer, adapter.json): the adapter's base in fp32 with the adapter merged into it, as a
    checkpoint of the fine-tuned model holds it. A LoRA on an output head tied to the embeddings unties
    the head (the config then says so)."""
    model, tokenizer, meta = load_trained(adapter_dir, None, weights, bf16=False)
    state = lora.base_state_dict(model)
    if getattr(model.config, "tie_embeddings", False) and state["out_head.weight"] is not state["tok_emb.weight"]:
        model.config = replace(model.config, tie_embeddings=False)
    return model, tokenizer, meta


def run_job(
    task: JobTask,
    options: dict,
    out,
    model: str,
    weights,
    lora_config: lora.LoraConfig,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    train: TrainConfig | None,
) -> dict:
    """Fine-tune `model` for `task`; write the adapter, config, metrics, report and plots to `out`.
    `options`: the job's arguments, recorded in config.json (a resumed run must repeat them)."""
    cfg = resolved_config(train)
    if cfg.quantize != "none" and not task.casts_base():
        raise LoraftError(
            f"--quantize {cfg.quantize} keeps the base frozen in {cfg.quantize}, and this --method trains base "
            f"weights, which quantized weights cannot be: use --method lora or head, or --quantize none"
        )
    if cfg.quantize != "none" and lora_config.changes_base:
        raise LoraftError(
            f"--init {lora_config.init} takes its part out of the base weights, which --quantize {cfg.quantize} "
            f"keeps frozen in fewer bits: use --init default or gaussian, or --quantize none"
        )
    out = Path(out)
    config = json.loads(json.dumps({**options, "train": asdict(cfg)}, default=str))
    with claimed(out, config, resume, overwrite) as main:
        quiet = quiet or not main
        started = time.perf_counter()
        # A base that trains frozen in bf16 is read straight into bf16: loading it in fp32 first
        # triples the memory of loading (benchmarks/load_memory.py). LoRA and new heads are fp32.
        bf16_base = cfg.bf16 and task.casts_base()
        base, tokenizer = load_model(model, weights, torch.bfloat16 if bf16_base else torch.float32, cfg.quantize)
        task.check(base, tokenizer)
        torch.manual_seed(cfg.seed)  # the LoRA A matrices (and a new head) start from it
        task.prepare(base, lora_config)
        base.to(cfg.device)
        quantized = quantization_of(base)
        adapter_meta = task.adapter_meta(cfg) | ({"base_quantized": quantized} if quantized != "none" else {})

        def save(m):
            return save_adapter(m, out / "adapter", **adapter_meta)

        # before the first measurement: settings that only the run's length can refute (AdaLoRA's schedule) fail early
        trainer_task, hook = task.trainer_task(tokenizer, cfg), lora.AdapterTraining(base)
        trainer = Trainer(base, trainer_task, cfg, out, on_best=save, quiet=quiet, hook=hook)
        out.mkdir(parents=True, exist_ok=True)
        if main:
            write_json(out / "config.json", config)
        before_file = out / "before.json"
        if resume and before_file.is_file():
            before = read_json(before_file)
        elif main:
            before = task.measure(base, tokenizer, cfg, None)
            write_json(before_file, before)

        if not quiet:
            counts = lora.parameter_summary(base)
            print(
                f"{model}: {counts['trainable']:,} of {counts['total']:,} parameters trainable; {task.describe(before, None)}"
            )
        state = trainer.run(resume)
        if not main:
            return {}  # process 0 saves the adapter, measures and reports
        save(base)  # the best weights, restored by the trainer
        ready_for_inference(base, cfg.bf16)
        after = task.measure(base, tokenizer, cfg, before)
        report = {
            "model": model,
            **task.report(before, after),
            "best_step": state["best_step"],
            "parameters": lora.parameter_summary(base),
            "adapter_bytes": (out / "adapter" / "adapter.safetensors").stat().st_size,
            "train_seconds": state["train_seconds"],
            "train_tokens_per_second": state["tokens"] / max(state["train_seconds"], 1e-9),
            "wall_seconds": time.perf_counter() - started,
        }
        files = {**task.files(before, after), "report.json": report}
        for name, content in files.items():
            write_json(out / name, content)
        plots = plot_run(out)
        if not quiet:
            print(f"{task.describe(before, after)}, {report['wall_seconds']:.0f} s\nadapter: {out / 'adapter'}")
            for name in files:
                print(f"{name.removesuffix('.json').replace('test-', '') + ':':8} {out / name}")
            print(f"plots:   {', '.join(str(p) for p in plots)}")
        return report
