"""Instruction data in the Alpaca format (the book's chapter 7): the book's 1,100 examples or a
user's file (or another format's reader: data/squad.py), the 85/10/5 split, the prompt templates, and
batches whose labels mark the tokens the loss counts."""

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from jinja2 import TemplateError, nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import LoraftError
from ..files import cache_dir, checked_file, data_dir, download_checked
from ..tokenizer import check_unicode
from .classification import check_keys_unique, check_no_split_empty, json_type, parse_json, read_rows, read_text_file

BOOK_DATA = "instruction-data"  # --data name of the book's file
URL = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json"
SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
# The book's file as it is, inside the package (Apache-2.0; attribution in LICENSE.txt beside it).
EMBEDDED = Path(__file__).parent / "instruction_data" / "instruction-data.json"
WHAT = "book's instruction-data.json"
KEYS = ("instruction", "input", "output")

TEMPLATES = ("alpaca", "chat", "qa")
DEFAULT_TEMPLATE = "alpaca"  # the book's; works for models without a chat template, and answers as well as "chat"
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


@dataclass
class Example:
    instruction: str
    input: str
    output: str  # the answer trained on
    answers: list[str] | None = None  # every gold answer, where there are several (SQuAD's); else the output

    @property
    def gold_answers(self) -> list[str]:
        return self.answers or [self.output]


@dataclass
class InstructionData:
    train: list[Example]
    val: list[Example]
    test: list[Example]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


# ---------------------------------------------------------------- files


def book_file(from_github: bool = False) -> Path:
    """With `from_github`, the book's file downloaded once from its repository into our cache; else
    $LORAFT_DATA_DIR/instruction/instruction-data.json when there; else the copy inside the package.
    Each must have the book's sha256."""
    if from_github:
        cached = cache_dir() / "instruction-data.json"
        if not cached.is_file():
            download(cached)
        return checked_file(cached, SHA256, WHAT, "delete it to download it again")
    local = data_dir() / "instruction" / "instruction-data.json" if data_dir() else None
    if local and local.is_file():
        return checked_file(local, SHA256, WHAT, "pass a file of your own with --data FILE.json")
    return checked_file(EMBEDDED, SHA256, WHAT, "reinstall loraft, or pass a copy with --data FILE.json")


def download(target: Path):
    download_checked(
        URL,
        SHA256,
        target,
        "instruction-data.json",
        "leave out --data-from-github to use the copy inside the package, or pass one with --data FILE.json",
    )


def read_examples(path) -> list[Example]:
    """A JSON list of {"instruction", "input", "output"} objects (or JSONL, one per line); "input"
    may be missing or empty, the other two must hold text."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        rows = read_rows(path)
    else:
        rows = parse_json(read_text_file(path), path)
        if not isinstance(rows, list):
            raise LoraftError(f"{path}: expected a JSON list of objects with {', '.join(KEYS)}")
        rows = list(enumerate(rows, 1))
    if not rows:
        raise LoraftError(f"{path} holds no examples")
    where = "line" if path.suffix.lower() == ".jsonl" else "example"
    examples = []
    for number, row in rows:
        if not isinstance(row, dict):
            raise LoraftError(f"{path} {where} {number}: expected an object with {', '.join(KEYS)}")
        check_keys_unique(row, f"{path} {where} {number}")
        missing = [key for key in ("instruction", "output") if key not in row]
        if missing:
            raise LoraftError(
                f"{path} {where} {number}: missing {' and '.join(repr(k) for k in missing)} (keys: {', '.join(row) or 'none'})"
            )
        values = {key: row.get(key, "") for key in KEYS}
        for key, value in values.items():
            if not isinstance(value, str):
                raise LoraftError(f"{path} {where} {number}: {key!r} must be text, not {json_type(value)}")
            check_unicode(value, f"{path} {where} {number}: the {key}")  # JSON's \ud800 escapes
        for key in ("instruction", "output"):
            if not values[key].strip():
                raise LoraftError(f"{path} {where} {number}: the {key} is empty")
        examples.append(Example(**values))
    return examples


def split_examples(examples: list[Example], seed: int) -> tuple[list, list, list]:
    """Shuffled with `seed`, then the book's cut: 85% train, 10% test, the rest (5%) validation."""
    order = np.random.RandomState(seed).permutation(len(examples))
    n_train, n_test = int(len(examples) * 0.85), int(len(examples) * 0.1)
    shuffled = [examples[i] for i in order]
    return shuffled[:n_train], shuffled[n_train + n_test :], shuffled[n_train : n_train + n_test]


def load_instruction_data(
    data: str = BOOK_DATA, val_file=None, test_file=None, seed: int = 123, from_github: bool = False, read=read_examples
) -> InstructionData:
    """The book's examples (`from_github`: downloaded, see book_file) or a user's file, read by `read`
    (a data format's reader), split by `seed`; separate validation/test files replace those parts of the
    split (the file then trains on what is left)."""
    if from_github and data != BOOK_DATA:
        raise LoraftError(f"--data-from-github downloads the book's file; it cannot go with --data {data}")
    examples = read(book_file(from_github) if data == BOOK_DATA else data)
    train, val, test = split_examples(examples, seed)
    if val_file or test_file:
        train = train + (val if val_file else []) + (test if test_file else [])
        val = read(val_file) if val_file else val
        test = read(test_file) if test_file else test
    dataset = InstructionData(train, val, test)
    check_no_split_empty(dataset.sizes(), data, f"{len(examples)} examples", "examples (20 at least)")
    return dataset


# ---------------------------------------------------------------- templates


def format_prompt(tokenizer, instruction: str, input: str, template: str) -> str:
    """The text before the response: the book's Alpaca prompt; the PEFT article's question-answering
    layout (the input is the context, the instruction the question); or one user turn (the input as a
    second paragraph of its message) in the model's own chat template, ready for the assistant's answer."""
    if template == "alpaca":
        text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
        if input:
            text += f"\n\n### Input:\n{input}"
        return text + "\n\n### Response:\n"
    if template == "qa":
        context = f"### CONTEXT\n{input}\n\n" if input else ""
        return f"{context}### QUESTION\n{instruction}\n\n### ANSWER\n"
    check_template(template)
    user = f"{instruction}\n\n{input}" if input else instruction
    return render_chat(tokenizer, [{"role": "user", "content": user}], add_generation_prompt=True)


def check_template(template: str):
    if template not in TEMPLATES:
        raise LoraftError(f"unknown template {template!r}; choose one of {TEMPLATES}")


class AnswerMarks(Extension):
    """transformers' {% generation %} ... {% endgeneration %}, which marks the assistant's tokens for its
    return_assistant_tokens_mask: here the body is rendered as it is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


@functools.lru_cache(maxsize=8)
def compiled_chat_template(source: str):
    """A chat template compiled as transformers' apply_chat_template compiles it (sandboxed, blocks
    trimmed, loop controls, its raise_exception and strftime_now helpers), so both render alike."""

    def raise_exception(message):
        raise LoraftError(f"the model's chat template refuses the conversation: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    extensions = ["jinja2.ext.loopcontrols", AnswerMarks]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=extensions)
    env.filters["tojson"] = tojson
    env.globals |= {"raise_exception": raise_exception, "strftime_now": lambda f: datetime.now().strftime(f)}
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise LoraftError(f"the model's chat template is not valid jinja2 ({e})") from None


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """`messages` in the model's chat template, with the variables transformers gives it."""
    if not tokenizer.chat_template:
        raise LoraftError("the model's tokenizer has no chat template; use --template alpaca")
    special = {
        "bos_token": getattr(tokenizer, "bos_id", None),
        "eos_token": tokenizer.eos_id,
        "pad_token": tokenizer.pad_id,
    }
    try:
        return compiled_chat_template(tokenizer.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **{key: "" if token is None else tokenizer.decode([token]) for key, token in special.items()},
        )
    except LoraftError:
        raise
    except Exception as e:  # a template's own error: jinja2's, or a Python one from a filter or test
        raise LoraftError(f"the model's chat template failed to render ({type(e).__name__}: {e})") from None


ANSWER = "\x00answer\x00"  # a stand-in answer, to find what the template writes after one


def end_id(tokenizer, template: str) -> int:
    """The token that ends a response: the one the chat template writes right after an answer
    (<|im_end|>, <|eot_id|>, <end_of_turn>, ...), the end-of-text token otherwise."""
    if template != "chat":
        return tokenizer.eos_id
    turns = [{"role": "user", "content": "?"}, {"role": "assistant", "content": ANSWER}]
    after = render_chat(tokenizer, turns, add_generation_prompt=False).partition(ANSWER)[2]
    if not after.strip():
        raise LoraftError(
            "the model's chat template writes no end-of-turn token after an answer; use --template alpaca"
        )
    return tokenizer.encode(after.strip())[0]


def encode_prompts(tokenizer, prompts: list[str], template: str) -> list[list[int]]:
    """Token ids of prompts: a chat template writes its own BOS (transformers' apply_chat_template adds
    none), the Alpaca prompt starts as the tokenizer starts a text."""
    start = [] if template == "chat" else tokenizer.bos_prefix
    return [start + ids for ids in tokenizer.encode_batch(prompts)]


def prompt_and_stops(tokenizer, instruction: str, input: str, template: str) -> tuple[list[int], frozenset[int]]:
    """The token ids of one prompt in `template`, and the tokens that end its answer: what every command
    that answers an instruction adapter (generate, chat, serve) asks and stops at."""
    (ids,) = encode_prompts(tokenizer, [format_prompt(tokenizer, instruction, input, template)], template)
    return ids, frozenset({end_id(tokenizer, template), tokenizer.eos_id})


def encode_examples(
    tokenizer, examples: list[Example], template: str, max_length: int
) -> tuple[list[list[int]], list[int]]:
    """Token ids of prompt + response + end token, cut to `max_length`, and each prompt's length.

    Prompt and response are encoded apart, as generation sees them: the prompt alone, then the
    tokens the model adds."""
    prompts = encode_prompts(
        tokenizer, [format_prompt(tokenizer, e.instruction, e.input, template) for e in examples], template
    )
    responses = tokenizer.encode_batch([e.output for e in examples])
    end = end_id(tokenizer, template)
    sequences = [(p + r + [end])[:max_length] for p, r in zip(prompts, responses)]
    return sequences, [min(len(p), max_length) for p in prompts]


# ---------------------------------------------------------------- batches


@dataclass
class Batch:
    input_ids: torch.Tensor  # (batch, longest - 1): each sequence but its last token, right-padded
    labels: torch.Tensor  # (batch, longest - 1): the next token at each position, -100 where not counted
    lengths: torch.Tensor  # (batch,) real input tokens per row


def collate(sequences: list[list[int]], pad_id: int, prompt_lengths: list[int] | None = None) -> Batch:
    """The book's collate: inputs and next-token targets, padding masked from the loss (-100) but
    each sequence's own end token kept as a target; with `prompt_lengths`, the prompt's tokens are
    masked too, so the loss counts the response alone."""
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest - 1), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), longest - 1), -100, dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq) - 1] = torch.tensor(seq[:-1])
        labels[row, : len(seq) - 1] = torch.tensor(seq[1:])
        if prompt_lengths:
            labels[row, : prompt_lengths[row] - 1] = -100
    return Batch(input_ids, labels, torch.tensor([len(s) - 1 for s in sequences]))
