"""Instruction fine-tuning (the book's chapter 7): a causal LM learns, with LoRA, to answer
Alpaca-format instructions; its loss on the validation and test examples and its generated answers
are measured before and after."""

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import lora
from .adapters import load_adapter, read_adapter, save_adapter
from .classifier import length_bucketed_batches
from .data.instruction import (
    BOOK_DATA,
    DEFAULT_TEMPLATE,
    Batch,
    Example,
    collate,
    encode_examples,
    end_id,
    format_prompt,
    load_instruction_data,
)
from .errors import LoraftError
from .evaluate import answer_scores
from .files import read_json, write_json
from .finetune import resolved_config
from .generate import stream_tokens
from .models import DEFAULT_MODEL, load_model, model_device
from .plots import plot_run
from .precision import bf16_autocast, bf16_supported, cast_frozen_weights, uses_bf16
from .run_folder import claimed
from .train import TrainConfig, Trainer


def token_losses(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every counted target, and where those targets are. The output head runs on
    the counted positions alone: the 49,152-word head is a fifth of the model's work per token."""
    device = model_device(model)
    hidden = model.hidden_states(batch.input_ids.to(device))
    counted = batch.labels.to(device) != -100
    logits = model.out_head(hidden[counted]).float()
    return nn.functional.cross_entropy(logits, batch.labels.to(device)[counted], reduction="none"), counted


class InstructionTask:
    """Training batches, loss and validation loss for `Trainer`."""

    best_metric = "loss"

    def __init__(self, tokenizer, data, template: str, max_length: int, mask_prompt: bool, seed: int, autocast: bool):
        self.tokenizer, self.data, self.template, self.max_length = tokenizer, data, template, max_length
        self.mask_prompt, self.seed, self.autocast = mask_prompt, seed, autocast
        self.train_tokens, self.train_prompt_lengths = encode_examples(tokenizer, data.train, template, max_length)

    def train_batches(self, epoch: int, batch_size: int) -> list[Batch]:
        rng = np.random.default_rng([self.seed, epoch])
        rows = length_bucketed_batches([len(t) for t in self.train_tokens], batch_size, rng)
        return [
            collate(
                [self.train_tokens[i] for i in r],
                self.tokenizer.pad_id,
                [self.train_prompt_lengths[i] for i in r] if self.mask_prompt else None,
            )
            for r in rows
        ]

    def loss(self, model, batch: Batch):
        losses, _ = token_losses(model, batch)
        return losses.sum() / max(1, losses.numel()), {}

    def evaluate(self, model) -> dict:
        return split_loss(
            model, self.tokenizer, self.data.val, self.template, self.max_length, self.mask_prompt, self.autocast
        )

    def batch_tokens(self, batch: Batch) -> int:
        return int(batch.lengths.sum())


@torch.no_grad()
def split_loss(
    model,
    tokenizer,
    examples: list[Example],
    template: str,
    max_length: int,
    mask_prompt: bool,
    autocast: bool,
    batch_size: int = 16,
) -> dict:
    """Mean loss per counted token (the training objective: prompt and response, or the response
    alone with `mask_prompt`), the loss on the response tokens alone, and their perplexities."""
    was_training = model.training
    model.eval()
    sequences, prompt_lengths = encode_examples(tokenizer, examples, template, max_length)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    total = {"all": 0.0, "response": 0.0}
    count = {"all": 0, "response": 0}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = collate([sequences[i] for i in rows], tokenizer.pad_id)
        with bf16_autocast(model_device(model), autocast):
            losses, counted = token_losses(model, batch)
        # A target belongs to the response from the position of the prompt's last token on.
        starts = torch.tensor([prompt_lengths[i] - 1 for i in rows])
        in_response = (torch.arange(counted.shape[1])[None, :] >= starts[:, None])[counted.cpu()]
        total["all"] += losses.sum().item()
        count["all"] += losses.numel()
        total["response"] += losses[in_response.to(losses.device)].sum().item()
        count["response"] += int(in_response.sum())
    model.train(was_training)
    response_loss = total["response"] / max(1, count["response"])
    loss = response_loss if mask_prompt else total["all"] / max(1, count["all"])
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "response_loss": response_loss,
        "response_perplexity": math.exp(response_loss),
    }


def stream_answer(
    model, tokenizer, meta: dict, instruction: str, input: str = "", max_new_tokens: int = 256, **sampling
):
    """Yield the tokens of the model's answer to an instruction (and its input), asked in the
    adapter's template, until its end token; `sampling`: temperature, top_k, seed (default greedy)."""
    template = meta.get("template", DEFAULT_TEMPLATE)
    prompt_ids = tokenizer.encode(format_prompt(instruction, input, template))
    tokens = stream_tokens(
        model, prompt_ids, max_new_tokens, stop_ids={end_id(tokenizer, template), tokenizer.eos_id}, **sampling
    )
    while True:
        with bf16_autocast(model_device(model), uses_bf16(model)):  # bf16 weights need it
            token = next(tokens, None)
        if token is None:
            return
        yield token


def respond(model, tokenizer, meta: dict, instruction: str, input: str = "", max_new_tokens: int = 256) -> str:
    """The model's greedy answer to an instruction (and its input), in the adapter's template."""
    return tokenizer.decode(list(stream_answer(model, tokenizer, meta, instruction, input, max_new_tokens))).strip()


def generate_answers(model, tokenizer, meta: dict, examples: list[Example], max_new_tokens: int) -> list[str]:
    was_training = model.training
    model.eval()
    answers = [respond(model, tokenizer, meta, e.instruction, e.input, max_new_tokens) for e in examples]
    model.train(was_training)
    return answers


def train_instruct(
    out="runs/instruct",
    model=DEFAULT_MODEL,
    weights=None,
    data=BOOK_DATA,
    val_file=None,
    test_file=None,
    template=DEFAULT_TEMPLATE,
    mask_prompt=True,  # measured: better answers than the book's loss on prompt and response (README)
    rank=16,
    alpha=16.0,
    scaling="standard",
    targets=("all-linear",),
    dropout=0.0,
    max_length=256,
    max_new_tokens=128,
    resume=False,
    overwrite=False,
    quiet=False,
    train: TrainConfig | None = None,
) -> dict:
    """Fine-tune `model` to follow the instructions in `data`; write the adapter, metrics, test
    answers, report and plots to `out`."""
    options = {k: v for k, v in locals().items() if k != "train"}
    cfg = resolved_config(train)
    if max_length < 2 or max_new_tokens < 1:
        raise LoraftError("--max-length must be at least 2 and --max-new-tokens at least 1")
    out = Path(out)
    config = json.loads(json.dumps({**options, "targets": list(targets), "train": asdict(cfg)}, default=str))
    dataset = load_instruction_data(data, val_file, test_file, cfg.seed)
    format_prompt("", "", template)  # an unknown template fails here, before anything is written
    with claimed(out, config, resume, overwrite) as main:
        quiet = quiet or not main
        started = time.perf_counter()
        base, tokenizer = load_model(model, weights)
        end_id(tokenizer, template)  # a chat template needs a model that has one
        if max_length > base.context_length:
            raise LoraftError(f"--max-length {max_length} exceeds {model}'s context length {base.context_length}")
        torch.manual_seed(cfg.seed)  # the LoRA A matrices start from it
        lora.apply_lora(base, rank, alpha, list(targets), scaling, dropout)
        base.to(cfg.device)
        if cfg.bf16:
            cast_frozen_weights(base, torch.bfloat16)
        task = InstructionTask(tokenizer, dataset, template, max_length, mask_prompt, cfg.seed, cfg.bf16)
        adapter_meta = dict(
            task="instruction", template=template, max_length=max_length, mask_prompt=mask_prompt, seed=cfg.seed
        )
        out.mkdir(parents=True, exist_ok=True)
        if main:
            write_json(out / "config.json", config)

        def measure(split: str) -> dict:
            return split_loss(base, tokenizer, getattr(dataset, split), template, max_length, mask_prompt, cfg.bf16)

        def answer(examples) -> list[str]:
            return generate_answers(base, tokenizer, adapter_meta, examples, max_new_tokens)

        before_file = out / "before.json"
        if resume and before_file.is_file():
            before = read_json(before_file)
        elif main:
            lora.set_active(base, None)  # the base model alone
            answers = answer(dataset.test)
            before = {
                "val": measure("val"),
                "test": measure("test"),
                "answers": answer_scores(answers, [e.output for e in dataset.test]),
                "generated": answers,
            }
            lora.set_active(base, "default")
            write_json(before_file, before)

        trainer = Trainer(
            base, task, cfg, out, on_best=lambda m: save_adapter(m, out / "adapter", **adapter_meta), quiet=quiet
        )
        if not quiet:
            counts = lora.parameter_summary(base)
            print(
                f"{model}: {counts['trainable']:,} of {counts['total']:,} parameters trainable; data {dataset.sizes()}; "
                f"before training: test loss {before['test']['loss']:.3f}, ROUGE-L {before['answers']['rouge_l']:.3f}"
            )
        state = trainer.run(resume)
        if not main:
            return {}  # process 0 saves the adapter, answers the test split and reports
        save_adapter(base, out / "adapter", **adapter_meta)  # the best weights, restored by the trainer
        lora.merge(base)  # generation at the base model's speed
        after = {"val": measure("val"), "test": measure("test")}
        generated_at = time.perf_counter()
        answers = answer(dataset.test)
        after["answers"] = answer_scores(answers, [e.output for e in dataset.test])
        generation_seconds = time.perf_counter() - generated_at
        responses = [
            {
                "instruction": e.instruction,
                "input": e.input,
                "expected": e.output,
                "generated": a,
                "generated_before": b,
            }
            for e, a, b in zip(dataset.test, answers, before["generated"])
        ]
        write_json(out / "test-responses.json", responses)
        report = {
            "model": model,
            "data": str(data),
            "template": template,
            "mask_prompt": mask_prompt,
            "sizes": dataset.sizes(),
            **{
                f"{split}_{key}_{when}": values[split][key]
                for when, values in (("before", before), ("after", after))
                for split in ("val", "test")
                for key in ("loss", "perplexity", "response_loss", "response_perplexity")
            },
            "answers_before": before["answers"],
            "answers_after": after["answers"],
            "max_new_tokens": max_new_tokens,
            "best_step": state["best_step"],
            "parameters": lora.parameter_summary(base),
            "adapter_bytes": (out / "adapter" / "adapter.safetensors").stat().st_size,
            "train_seconds": state["train_seconds"],
            "train_tokens_per_second": state["tokens"] / max(state["train_seconds"], 1e-9),
            "generation_seconds_after": generation_seconds,
            "wall_seconds": time.perf_counter() - started,
        }
        write_json(out / "report.json", report)
        plots = plot_run(out)
        if not quiet:
            print(
                f"test loss {report['test_loss_before']:.3f} -> {report['test_loss_after']:.3f} "
                f"(perplexity {report['test_perplexity_before']:.1f} -> {report['test_perplexity_after']:.1f}), "
                f"ROUGE-L {before['answers']['rouge_l']:.3f} -> {after['answers']['rouge_l']:.3f}, "
                f"exact match {before['answers']['exact_match']:.3f} -> {after['answers']['exact_match']:.3f}, "
                f"{report['wall_seconds']:.0f} s\nadapter: {out / 'adapter'}\nanswers: {out / 'test-responses.json'}\n"
                f"report:  {out / 'report.json'}\nplots:   {', '.join(str(p) for p in plots)}"
            )
        return report


def load_instruct(adapter_dir, weights=None):
    """(model, tokenizer, adapter metadata) ready to answer, the adapter merged for speed."""
    meta, _ = read_adapter(adapter_dir)
    if meta.get("task") != "instruction":
        raise LoraftError(f"{adapter_dir} is not an instruction adapter (task {meta.get('task')!r})")
    model, tokenizer = load_model(meta["base_model"], weights)
    load_adapter(model, adapter_dir)
    if bf16_supported():  # cast, then merge: the weights the training job answered the test with
        cast_frozen_weights(model, torch.bfloat16)
    lora.merge(model)
    return model, tokenizer, meta
