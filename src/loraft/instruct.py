"""Instruction fine-tuning (the book's chapter 7): a causal LM learns, with LoRA, to answer
Alpaca-format instructions (or SQuAD's questions about a context); its loss on the validation and test
examples and its generated answers (SQuAD's exact match and F1, ROUGE-L) are measured before and after."""

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from . import lora
from .classifier import epoch_batches
from .data.instruction import (
    BOOK_DATA,
    DEFAULT_TEMPLATE,
    Batch,
    Example,
    check_template,
    collate,
    encode_examples,
    end_id,
    load_instruction_data,
    prompt_and_stops,
    read_examples,
)
from .data.squad import read_squad
from .errors import LoraftError
from .evaluate import answer_scores
from .generate import stream_tokens
from .job import load_trained, run_job
from .models import DEFAULT_MODEL, model_device
from .precision import bf16_autocast, uses_bf16
from .train import TrainConfig

DATA_FORMATS = {"alpaca": read_examples, "squad": read_squad}  # --format: each file format's reader


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
        def batch(rows):
            prompt_lengths = [self.train_prompt_lengths[i] for i in rows] if self.mask_prompt else None
            return collate([self.train_tokens[i] for i in rows], self.tokenizer.pad_id, prompt_lengths)

        return epoch_batches(self.train_tokens, batch_size, [self.seed, epoch], batch)

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
    prompt_ids, stop_ids = prompt_and_stops(tokenizer, instruction, input, meta.get("template", DEFAULT_TEMPLATE))
    tokens = stream_tokens(model, prompt_ids, max_new_tokens, stop_ids=stop_ids, **sampling)
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


@dataclass
class InstructionJob:
    """What the job skeleton (job.py) needs to teach a model to follow the instructions of `data`."""

    data: object  # InstructionData
    template: str
    max_length: int
    mask_prompt: bool
    max_new_tokens: int
    data_format: str = "alpaca"
    name = "instruction"

    def check(self, model, tokenizer):
        end_id(tokenizer, self.template)  # a chat template needs a model that has one
        if self.max_length > model.context_length:
            raise LoraftError(
                f"--max-length {self.max_length} exceeds {model.name}'s context length {model.context_length}"
            )

    def prepare(self, model, lora_config):
        lora.apply_lora(model, lora_config)

    def casts_base(self) -> bool:
        return True

    def trainer_task(self, tokenizer, cfg: TrainConfig):
        return InstructionTask(
            tokenizer, self.data, self.template, self.max_length, self.mask_prompt, cfg.seed, cfg.bf16
        )

    def adapter_meta(self, cfg: TrainConfig) -> dict:
        return dict(
            task=self.name,
            template=self.template,
            max_length=self.max_length,
            mask_prompt=self.mask_prompt,
            seed=cfg.seed,
        )

    def measure(self, model, tokenizer, cfg: TrainConfig, before: dict | None) -> dict:
        """Losses on the validation and test splits and the answers to the test instructions, of the base
        model alone (before) or with the trained adapter merged (after). Before, a new adapter adds
        nothing, or (PiSSA, OLoRA) gives back what its init took out of the base weights: it is left
        out where it adds nothing, for speed."""
        base_alone = before is None and not lora.base_changed(model)
        if base_alone:
            lora.set_active(model, None)
        losses = {
            split: split_loss(
                model, tokenizer, getattr(self.data, split), self.template, self.max_length, self.mask_prompt, cfg.bf16
            )
            for split in ("val", "test")
        }
        generated_at = time.perf_counter()
        answers = generate_answers(model, tokenizer, {"template": self.template}, self.data.test, self.max_new_tokens)
        seconds = time.perf_counter() - generated_at
        if base_alone:
            lora.set_active(model, "default")
        scores = answer_scores(answers, [e.gold_answers for e in self.data.test])
        return {**losses, "answers": scores, "generated": answers, "generation_seconds": seconds}

    def report(self, before: dict, after: dict) -> dict:
        losses = {
            f"{split}_{key}_{when}": values[split][key]
            for when, values in (("before", before), ("after", after))
            for split in ("val", "test")
            for key in ("loss", "perplexity", "response_loss", "response_perplexity")
        }
        return {
            "format": self.data_format,
            "template": self.template,
            "mask_prompt": self.mask_prompt,
            "sizes": self.data.sizes(),
            **losses,
            "answers_before": before["answers"],
            "answers_after": after["answers"],
            "max_new_tokens": self.max_new_tokens,
            "generation_seconds_after": after["generation_seconds"],
        }

    def files(self, before: dict, after: dict) -> dict:
        responses = [
            {
                "instruction": e.instruction,
                "input": e.input,
                "expected": e.output,
                **({"answers": e.answers} if e.answers else {}),
                "generated": a,
                "generated_before": b,
            }
            for e, a, b in zip(self.data.test, after["generated"], before["generated"])
        ]
        return {"test-responses.json": responses}

    def describe(self, before: dict, after: dict | None) -> str:
        if after is None:
            return (
                f"data {self.data.sizes()}; before training: test loss {before['test']['loss']:.3f}, "
                f"ROUGE-L {before['answers']['rouge_l']:.3f}"
            )
        return (
            f"test loss {before['test']['loss']:.3f} -> {after['test']['loss']:.3f} "
            f"(perplexity {before['test']['perplexity']:.1f} -> {after['test']['perplexity']:.1f}), "
            f"ROUGE-L {before['answers']['rouge_l']:.3f} -> {after['answers']['rouge_l']:.3f}"
            + "".join(
                f", {name} {before['answers'][key]:.3f} -> {after['answers'][key]:.3f}"
                for name, key in (("exact match", "exact_match"), ("F1", "f1"))
                if key in before["answers"]  # a run resumed from before these were measured lacks them
            )
        )


def train_instruct(
    out="runs/instruct",
    model=DEFAULT_MODEL,
    weights=None,
    data=BOOK_DATA,
    data_format="alpaca",
    data_from_github=False,
    val_file=None,
    test_file=None,
    template=DEFAULT_TEMPLATE,
    mask_prompt=True,  # better answers than the book's loss on prompt and response (README)
    lora_config: lora.LoraConfig | None = None,
    max_length=256,
    max_new_tokens=128,
    resume=False,
    overwrite=False,
    quiet=False,
    train: TrainConfig | None = None,
) -> dict:
    """Fine-tune `model` to follow the instructions in `data`; write the adapter, metrics, test
    answers, report and plots to `out`."""
    lora_config = lora_config or lora.LoraConfig()
    options = {k: v for k, v in locals().items() if k not in ("train", "lora_config")} | lora_config.as_dict()
    if max_length < 2 or max_new_tokens < 1:
        raise LoraftError("--max-length must be at least 2 and --max-new-tokens at least 1")
    if data_format not in DATA_FORMATS:
        raise LoraftError(f"unknown data format {data_format!r}; choose one of {list(DATA_FORMATS)}")
    if data_format != "alpaca" and data == BOOK_DATA:
        raise LoraftError(
            f"--format {data_format} reads your --data FILE; the book's examples are in the Alpaca format"
        )
    seed = (train or TrainConfig()).seed
    dataset = load_instruction_data(data, val_file, test_file, seed, data_from_github, DATA_FORMATS[data_format])
    check_template(template)  # an unknown template fails here, before anything is written
    job = InstructionJob(dataset, template, max_length, mask_prompt, max_new_tokens, data_format)
    report = run_job(job, options, out, model, weights, lora_config, resume, overwrite, quiet, train)
    return report and {"model": model, "data": str(data), **report}


def load_instruct(adapter_dir, weights=None, quantize: str = "none", bf16: bool | None = None):
    """(model, tokenizer, adapter metadata) ready to answer, as the training job answered its test;
    `bf16`: the base in bf16 (default: where it runs natively), else fp32."""
    return load_trained(adapter_dir, "instruction", weights, quantize, bf16)
