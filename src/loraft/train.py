"""The one training loop (classification and instruction tuning share it).

AdamW on the trainable parameters, warmup then decay, gradient accumulation and clipping, bf16
autocast, evaluation every N optimizer steps, the best weights by validation kept, and a checkpoint
(trainable weights, optimizer, scheduler, RNG, position in the data) from which `resume` continues
an interrupted run to the same result as an uninterrupted one.

Under `torchrun` the same loop runs in every process, wrapped in DistributedDataParallel: each process
takes its share of every global batch (--batch-size stays the global batch, the gradient the one a
single process would compute), and process 0 alone evaluates, logs and writes checkpoints.
"""

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import distributed
from .errors import LoraftError
from .files import atomic_write, json_safe
from .models import model_device
from .precision import bf16_autocast
from .quantize import MODES as QUANTIZE_MODES
from .quantize import fuse_dequantizing, quantization_of
from .run_folder import changed_settings

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    epochs: int = 3
    max_steps: int = 0  # train this many optimizer steps, more or fewer than the epochs hold, the schedule spanning them (0: the epochs decide)
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of all optimizer steps
    schedule: str = "cosine"
    grad_accum: int = 1
    clip: float = 1.0
    eval_every: int = 50  # optimizer steps; also how often a checkpoint is written
    seed: int = 123
    bf16: bool = True
    gradient_checkpointing: bool = False  # recompute each block's activations in backward: less memory
    compile: bool = False  # torch.compile the blocks while training, or a quantized base's dequantization (the CLI's default for Llama models on a CPU, where a C++ compiler is found)
    device: str = "auto"  # cpu, cuda, cuda:N; auto: a CUDA GPU when PyTorch finds one, else the CPU
    save_every: int = 0  # optimizer steps between checkpoints besides those at each evaluation (0: none)
    skip_nonfinite: int = 0  # optimizer steps with a NaN or infinite loss or gradient skipped before the run stops
    quantize: str = "none"  # the frozen base's block linear layers in int8 or nf4 (QLoRA; quantize.py)


@dataclass
class Progress:
    """Where a run stands, saved whole in every checkpoint (as a dict, `asdict`)."""

    epoch: int = 0
    batch: int = 0  # the next batch of this epoch
    step: int = 0  # optimizer steps done
    examples: int = 0
    tokens: int = 0
    train_seconds: float = 0.0  # the loop's own time, evaluations left out
    loss_sum: float = 0.0  # since the last evaluation, as are correct, count and batches_since_eval
    correct: int = 0
    count: int = 0
    batches_since_eval: int = 0
    best: list | None = None  # [the best metric, its validation loss]
    best_step: int | None = None
    skipped_steps: int = 0

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "Progress":
        """An earlier loraft's checkpoint may lack the newer counters: they start from their defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


class Task(Protocol):
    """What the loop needs to know about a task."""

    best_metric: str  # a key of evaluate()'s result; higher is better unless it ends in "loss"

    def train_batches(self, epoch: int, batch_size: int) -> list: ...  # the same list for the same epoch

    def loss(self, model, batch) -> tuple[torch.Tensor, dict]: ...  # mean loss, {"correct", "count"}

    def evaluate(self, model) -> dict: ...  # validation metrics

    def batch_tokens(self, batch) -> int: ...


class StepHook:
    """What the trained thing asks of the loop beyond its loss's gradient, at four points: before the
    first step, the optimizer's parameter groups, a penalty added to the loss, and a call after each
    step (lora.AdapterTraining: LoRA+'s learning rates, AdaLoRA's orthogonality penalty and rank
    allocation); its state goes into checkpoints. This one asks nothing."""

    def start(self, total_steps: int):
        pass

    def param_groups(self, params: dict[str, nn.Parameter], lr: float, weight_decay: float) -> list[dict]:
        return [{"params": list(params.values())}]

    def penalty(self) -> torch.Tensor | None:
        return None

    def after_step(self, step: int):
        """After optimizer step `step` (counted from 0), before its gradients are cleared."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass


class TaskLoss(nn.Module):
    """The task's loss as a module's forward: DistributedDataParallel synchronises gradients only for
    a backward pass that follows its own forward, and tasks call model parts, not model.forward."""

    def __init__(self, model: nn.Module, task: Task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch):
        return self.task.loss(self.model, batch)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1 - progress
    return 1.0


def check_config(cfg: TrainConfig):
    for name in ("epochs", "batch_size", "grad_accum", "eval_every"):
        if getattr(cfg, name) < 1:
            raise LoraftError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("lr", "weight_decay", "warmup", "clip"):
        if not math.isfinite(getattr(cfg, name)):
            raise LoraftError(f"--{name.replace('_', '-')} must be a finite number, not {getattr(cfg, name)}")
    if cfg.skip_nonfinite < 0 or cfg.save_every < 0 or cfg.max_steps < 0:
        raise LoraftError("--skip-nonfinite, --save-every and --max-steps must be at least 0")
    if cfg.schedule not in SCHEDULES:
        raise LoraftError(f"unknown schedule {cfg.schedule!r}; choose one of {SCHEDULES}")
    if not cfg.lr > 0:
        raise LoraftError("--lr must be positive")
    if cfg.weight_decay < 0 or cfg.clip < 0 or not 0 <= cfg.warmup < 1:
        raise LoraftError("--weight-decay and --clip must be >= 0, --warmup in [0, 1)")
    if cfg.quantize not in QUANTIZE_MODES:
        raise LoraftError(f"unknown --quantize {cfg.quantize!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    if cfg.compile:
        check_compiler()


def pick_device(name: str) -> torch.device:
    """--device as a torch.device; under torchrun, "auto" and "cuda" are the process's own GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise LoraftError(f"--device {name!r}: choose auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoraftError(f"--device {name}: PyTorch finds no CUDA GPU here (torch {torch.__version__})")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise LoraftError(f"--device {name}: there are {torch.cuda.device_count()} GPUs, numbered from 0")
    if device.index is not None and distributed.world_size_requested() > 1:
        raise LoraftError(f"--device {name}: under torchrun every process takes its own GPU; pass --device cuda")
    return device


def is_better(metric: str, row: dict, best: list | None) -> bool:
    """Higher `metric` wins (lower, for a loss); a tie goes to the later weights. Small validation
    sets tie often, and the later, annealed weights classify unseen texts better than the early ones
    with a lower validation loss (README, "The spam classifier")."""
    if best is None:
        return True
    value = row[f"val_{metric}"]
    if metric.endswith("loss"):
        return value < best[0]
    return value >= best[0]


def compiler_found() -> bool:
    """torch.compile on a CPU writes C++ and builds it with the system's compiler."""
    return any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), "g++", "clang++"))


def check_compiler():
    """--compile on a CPU, refused in one line where no compiler is found."""
    if not compiler_found():
        raise LoraftError(
            "--compile needs a C++ compiler (g++, clang++ or $CXX) on PATH; install one, or drop --compile"
        )


def compile_blocks(model: nn.Module):
    """torch.compile the transformer blocks for training: with LoRA, one compiled graph serves them
    all, with dynamic shapes since every batch has its own length, and with the LoRA scales as
    symbols, so that a sweep over alphas in one process compiles once (plus a second trace, the
    first time). Left eager, as each would compile a graph of its own that costs more to compile than
    it saves: block 0, whose input (the frozen embedding) needs no gradient, and every pass without
    gradients, evaluation's. A quantized base's blocks stay eager (compiled, autograd would keep each
    dequantized weight for backward, the copy QLoRA exists to avoid): its dequantization compiles instead."""
    if quantization_of(model) != "none":
        fuse_dequantizing(model)
        return
    for block in model.trf_blocks[1:]:
        block.forward = compiled_for_training(block.forward)


def compiled_for_training(forward):
    """`forward`, compiled where gradients are on, eager where they are off."""
    compiled = torch.compile(forward, dynamic=True)

    def run(*args, **kwargs):
        return (compiled if torch.is_grad_enabled() else forward)(*args, **kwargs)

    return run


def uncompile_blocks(model: nn.Module):
    """Back to eager blocks once training ends: a later pass with gradients (on a merged model, say)
    would otherwise compile a graph of its own."""
    for block in model.trf_blocks:
        block.__dict__.pop("forward", None)


class RunStopped(LoraftError):
    """A run stopped on request (SIGTERM, Ctrl-C) after writing its checkpoint."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """While training, SIGTERM and a first Ctrl-C ask the loop to stop after the current step (it writes
    a checkpoint first); a second Ctrl-C stops at once. Only in the main thread of a single process:
    under torchrun a process stopping alone would leave the others waiting in an all-reduce."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signal, self.number, self.previous = None, 0, {}

    def __enter__(self):
        if self.enabled:
            for number in (signal.SIGTERM, signal.SIGINT):
                self.previous[number] = signal.signal(number, self.request)
        return self

    def request(self, number, frame):
        if self.signal == "Ctrl-C" and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal, self.number = ("Ctrl-C" if number == signal.SIGINT else "SIGTERM"), number

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


class Trainer:
    def __init__(self, model: nn.Module, task: Task, cfg: TrainConfig, out: Path, on_best=None, quiet=False, hook=None):
        check_config(cfg)
        self.model, self.task, self.cfg, self.out = model, task, cfg, Path(out)
        self.on_best = on_best  # called with the model whenever validation improves (saves the adapter)
        self.quiet = quiet
        self.hook = hook or StepHook()
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise LoraftError("nothing to train: no parameter requires a gradient")
        self.device = model_device(model)
        model.gradient_checkpointing = cfg.gradient_checkpointing  # read by the models' block loops
        self.is_main, self.world = distributed.is_main(), distributed.world_size()
        self.task_loss = TaskLoss(model, task)
        if self.world > 1:  # synchronises the parameters that require a gradient, and only those
            # buffers (RoPE tables, a quantized base) are the same everywhere from loading: never broadcast
            self.task_loss = DistributedDataParallel(self.task_loss, broadcast_buffers=False)
        self.steps_per_epoch = math.ceil(len(task.train_batches(0, cfg.batch_size)) / cfg.grad_accum)
        # as transformers' Trainer: max_steps, when given, decides, however many epochs that takes
        self.total_steps = cfg.max_steps or self.steps_per_epoch * cfg.epochs
        self.hook.start(self.total_steps)
        # fused: one kernel updates every tensor. On a CPU PyTorch's default is a Python loop over the
        # tensors, and LoRA trains hundreds of small ones.
        groups = self.hook.param_groups(self.params, cfg.lr, cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        warmup = round(cfg.warmup * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.total_steps, warmup, cfg.schedule)
        )
        self.progress = Progress()
        self.best_weights = None
        self.checkpoint_file = self.out / "checkpoint.pt"
        self.checkpoint_step = None
        self.metrics_file = self.out / "metrics.jsonl"

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self):
        checkpoint = {
            "params": {n: p.detach().clone() for n, p in self.params.items()},
            "best_weights": self.best_weights,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "state": asdict(self.progress),
            "config": asdict(self.cfg),
            "hook": self.hook.state_dict(),
        }
        atomic_write(self.checkpoint_file, lambda tmp: torch.save(checkpoint, tmp))
        self.checkpoint_step = self.progress.step

    def load_checkpoint(self):
        if not self.checkpoint_file.is_file():
            raise LoraftError(f"--resume: no checkpoint in {self.out}")
        try:
            ckpt = torch.load(self.checkpoint_file, map_location="cpu", weights_only=True)  # copied to the device below
        except Exception as e:
            raise LoraftError(f"--resume: {self.checkpoint_file} is unreadable ({type(e).__name__})") from None
        changed = changed_settings(ckpt["config"], asdict(self.cfg))
        if changed:
            raise LoraftError(f"--resume: the run in {self.out} used other settings: {changed} (was, now)")
        if set(ckpt["params"]) != set(self.params):
            raise LoraftError(f"--resume: the checkpoint in {self.out} trains other parameters than this model")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(ckpt["params"][n])
        self.best_weights = ckpt["best_weights"]
        for group in ckpt["optimizer"]["param_groups"]:  # loading would keep an earlier loraft's unfused AdamW
            group["fused"] = True
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        if ckpt.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["cuda_rng"], self.device)
        self.hook.load_state_dict(ckpt.get("hook", {}))
        self.progress = Progress.from_checkpoint(ckpt["state"])
        self.checkpoint_step = self.progress.step
        # Rows logged after the checkpoint will be logged again.
        if self.is_main and self.metrics_file.is_file():
            kept = []
            for line in self.metrics_file.read_text().split("\n"):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # empty, or torn by the interruption
                    continue
                if row["step"] <= self.progress.step:
                    kept.append(row)
            atomic_write(self.metrics_file, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept)))

    # ------------------------------------------------------------ the loop

    def log_evaluation(self):
        progress = self.progress
        val = self.task.evaluate(self.model)
        row = {
            "step": progress.step,
            "epoch": progress.step / self.steps_per_epoch,
            "examples_seen": progress.examples,
            "tokens_seen": progress.tokens,
            "train_seconds": progress.train_seconds,
            "train_loss": progress.loss_sum / max(1, progress.batches_since_eval),
            "skipped_steps": progress.skipped_steps,
            **({"train_accuracy": progress.correct / progress.count} if progress.count else {}),
            **{f"val_{k}": v for k, v in val.items() if isinstance(v, (int, float))},
        }
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(json_safe(row)) + "\n")
        progress.loss_sum, progress.correct, progress.count, progress.batches_since_eval = 0.0, 0, 0, 0
        if is_better(self.task.best_metric, row, progress.best):
            progress.best, progress.best_step = [row[f"val_{self.task.best_metric}"], row["val_loss"]], progress.step
            self.best_weights = {n: p.detach().clone() for n, p in self.params.items()}
            if self.on_best:
                self.on_best(self.model)
        self.save_checkpoint()
        return row

    def run(self, resume: bool = False) -> dict:
        """Train (from the checkpoint, with `resume`), leave the model in eval mode with the best
        weights by validation, and return the final `Progress` as a dict."""
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load_checkpoint()
        else:
            torch.manual_seed(self.cfg.seed)
            if self.is_main:
                self.metrics_file.write_text("")
        cfg, progress = self.cfg, self.progress
        self.model.train()
        if cfg.compile:
            compile_blocks(self.model)
        bar = tqdm(
            total=self.total_steps,
            initial=progress.step,
            disable=self.quiet or not self.is_main,
            unit="step",
            dynamic_ncols=True,
        )
        with StopSignals(enabled=self.world == 1) as stop:
            while progress.step < self.total_steps:
                batches = self.task.train_batches(progress.epoch, cfg.batch_size)
                while progress.batch < len(batches):  # a resumed run starts where it stopped
                    self.train_step(batches[progress.batch : progress.batch + cfg.grad_accum])
                    end_of_epoch = progress.batch >= len(batches)
                    if end_of_epoch:
                        progress.epoch, progress.batch = progress.epoch + 1, 0
                    at_end = end_of_epoch or progress.step == self.total_steps
                    self.after_step(bar, stop, at_end)
                    if at_end:
                        break
        bar.close()
        if cfg.compile:
            uncompile_blocks(self.model)
        self.restore_best_weights()
        self.model.eval()
        return asdict(progress)

    def restore_best_weights(self):
        if self.best_weights is not None:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(self.best_weights[n])

    def train_step(self, group: list):
        """One optimizer step over `group`, its micro-batches; a step with a non-finite loss or gradient
        norm is skipped, or stops the run."""
        cfg, p = self.cfg, self.progress
        started = time.perf_counter()
        examples = sum(len(b.labels) for b in group)
        loss_sum, correct, count = self.accumulate_gradients(group, examples)
        # The norm of the summed gradients, the same in every process: they all skip or stop alike.
        norm = nn.utils.clip_grad_norm_(self.params.values(), cfg.clip if cfg.clip > 0 else math.inf)
        if math.isfinite(loss_sum) and torch.isfinite(norm):
            p.loss_sum += loss_sum
            p.correct += int(correct)
            p.count += int(count)
            self.optimizer.step()
            self.hook.after_step(p.step)
        else:
            self.skip_nonfinite_step(loss_sum, float(norm))
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        p.batch += len(group)
        p.step += 1
        p.examples += examples
        p.batches_since_eval += 1
        p.train_seconds += time.perf_counter() - started

    def accumulate_gradients(self, group: list, examples: int) -> list:
        """Forward and backward over each micro-batch (this process's rows of it); the step's mean loss,
        correct and count, summed over processes."""
        loss_sum = correct = count = 0
        for i, batch in enumerate(group):
            rows, n = distributed.shard(batch)
            with self.sync_gradients(last=i == len(group) - 1):
                with bf16_autocast(self.device, self.cfg.bf16):
                    loss, stats = self.task_loss(rows)
                penalty = self.hook.penalty()  # fp32; the logged loss is the task's alone
                objective = loss if penalty is None else loss + penalty
                # Weighted by examples; DDP averages over processes, hence the world size.
                (objective * n / examples * self.world).backward()
            if n:
                loss_sum += loss.item() * n / examples
                correct += stats.get("correct", 0)
                count += stats.get("count", 0)
            self.progress.tokens += self.task.batch_tokens(batch)
        return distributed.sum_over_processes([loss_sum, correct, count])

    def after_step(self, bar: tqdm, stop: StopSignals, at_end: bool):
        """The progress bar; then an evaluation (every --eval-every steps, and at the end of each epoch
        and of the run) or a checkpoint (every --save-every steps, or before stopping on a signal); then the stop."""
        cfg, p = self.cfg, self.progress
        bar.update(1)
        postfix = {"loss": f"{p.loss_sum / p.batches_since_eval:.3f}"}
        if p.count:
            postfix["acc"] = f"{p.correct / p.count:.3f}"
        bar.set_postfix(postfix)
        if (p.step % cfg.eval_every == 0 or at_end) and self.is_main:
            row = self.log_evaluation()
            if not self.quiet:
                bar.write(self.describe(row))
            self.model.train()
        elif self.is_main and (stop.signal or cfg.save_every and p.step % cfg.save_every == 0):
            self.save_checkpoint()
        if stop.signal:
            bar.close()
            raise RunStopped(
                f"stopped by {stop.signal} after step {p.step} of {self.total_steps}; the checkpoint in "
                f"{self.out} holds it: continue with the same command and --resume",
                exit_code=128 + stop.number,
            )

    def skip_nonfinite_step(self, loss: float, norm: float):
        """Drop this step's gradients, or stop the run once --skip-nonfinite such steps are used up: the
        weights stay those of the last finite step, and nothing is written from non-finite ones."""
        self.optimizer.zero_grad(set_to_none=True)
        p, cfg = self.progress, self.cfg
        p.skipped_steps += 1
        if p.skipped_steps > cfg.skip_nonfinite:
            saved = self.checkpoint_step
            last = "no checkpoint was written yet" if saved is None else f"its last checkpoint is from step {saved}"
            clip = ", --clip 1.0" if not 0 < cfg.clip <= 1 else ""
            raise LoraftError(
                f"step {p.step + 1}: the training loss is {loss:g} and the gradient norm {norm:g}; the run stopped "
                f"({last}; the adapter, if any, holds finite weights). Start over with --overwrite and a lower --lr "
                f"(now {cfg.lr:g}){clip}, or continue with --resume --skip-nonfinite N to skip such steps"
            )

    def sync_gradients(self, last: bool):
        """DDP all-reduces the gradients after the last micro-batch of a step; the others only add up."""
        return contextlib.nullcontext() if last or self.world == 1 else self.task_loss.no_sync()

    def describe(self, row: dict) -> str:
        parts = [f"step {row['step']}", f"epoch {row['epoch']:.2f}", f"train loss {row['train_loss']:.3f}"]
        parts += [f"{k.replace('_', ' ')} {v:.3f}" for k, v in row.items() if k.startswith("val_") and k != "val_count"]
        return ", ".join(parts)
