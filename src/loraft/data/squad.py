"""Question answering as instruction data (`loraft instruct --format squad`): SQuAD v1.1 and v2.0 JSON
files (data -> paragraphs -> context, qas -> question, answers, is_impossible), or JSONL with context,
question and answer on each line. Each question becomes an Example: the question its instruction, the
context its input, the first gold answer the answer trained on, and every gold answer kept for
SQuAD's exact match and F1 (evaluate.answer_scores).

An unanswerable v2.0 question (is_impossible, no answers) has the empty answer, as SQuAD v2.0's
official evaluation defines it: there an empty prediction scores 1 and any other 0, so the model is
taught to end its answer at once (the PEFT article's "Cannot Find Answer" would score 0 there)."""

from pathlib import Path

from ..errors import LoraftError
from ..evaluate import normalize_answer
from ..tokenizer import check_unicode
from .classification import check_keys_unique, json_type, parse_json, read_rows, read_text_file
from .instruction import Example


def read_squad(path) -> list[Example]:
    """The questions of a SQuAD JSON file, or of a .jsonl file of {"context", "question", "answer"}
    (the answer a text, or a list of gold answers, the first trained on; "" or [] for no answer)."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        examples = [jsonl_example(row, f"{path} line {number}") for number, row in read_rows(path)]
    else:
        squad = parse_json(read_text_file(path), path)
        if not isinstance(squad, dict) or not isinstance(squad.get("data"), list):
            raise LoraftError(
                f'{path}: expected SQuAD\'s JSON, an object whose "data" lists articles of paragraphs '
                f'(or a .jsonl file of "context", "question", "answer")'
            )
        examples = []
        for a, article in enumerate(squad["data"]):
            for p, paragraph in enumerate(field(article, "paragraphs", list, f"{path}: data[{a}]")):
                where = f"{path}: data[{a}].paragraphs[{p}]"
                context = text(paragraph, "context", where)
                for q, qa in enumerate(field(paragraph, "qas", list, where)):
                    examples.append(squad_example(qa, context, f"{where}.qas[{q}]"))
    if not examples:
        raise LoraftError(f"{path} holds no questions")
    return examples


def squad_example(qa, context: str, where: str) -> Example:
    question = text(qa, "question", where)
    impossible = qa.get("is_impossible", False)
    if not isinstance(impossible, bool):
        raise LoraftError(f"{where}: is_impossible must be true or false, not {json_type(impossible)}")
    answers = [
        text(answer, "text", f"{where}.answers[{i}]") for i, answer in enumerate(field(qa, "answers", list, where))
    ]
    if impossible and answers:
        raise LoraftError(f"{where}: the question is_impossible, yet it has answers")
    if not impossible and not answers:
        raise LoraftError(
            f"{where}: the question has no answers (an unanswerable SQuAD v2.0 question says is_impossible)"
        )
    return qa_example(question, context, answers)


def jsonl_example(row: dict, where: str) -> Example:
    question, context = text(row, "question", where), text(row, "context", where)
    if "answer" not in row:
        raise LoraftError(f"{where}: missing 'answer' (keys: {', '.join(row)})")
    answers = [row["answer"]] if isinstance(row["answer"], str) else row["answer"]
    if not isinstance(answers, list) or not all(isinstance(answer, str) for answer in answers):
        raise LoraftError(f'{where}: "answer" must be a text or a list of texts ("" or [] for no answer)')
    for i, answer in enumerate(answers):
        check_unicode(answer, f"{where}: answer {i + 1}")
    return qa_example(question, context, [answer for answer in answers if answer])


def qa_example(question: str, context: str, answers: list[str]) -> Example:
    """Trained on the first answer; scored, as SQuAD scores, against the answers that are not empty once
    normalised, or the empty answer where none is left."""
    gold = [answer for answer in answers if normalize_answer(answer)] or [""]
    return Example(question, context, answers[0] if answers else "", gold)


def field(obj, key: str, kind: type, where: str):
    if not isinstance(obj, dict):
        raise LoraftError(f"{where}: expected an object, not {json_type(obj)}")
    check_keys_unique(obj, where)
    if key not in obj:
        raise LoraftError(f"{where}: missing {key!r} (keys: {', '.join(obj) or 'none'})")
    if not isinstance(obj[key], kind):
        raise LoraftError(f"{where}: {key!r} must be a {'list' if kind is list else 'text'}, not {json_type(obj[key])}")
    return obj[key]


def text(obj, key: str, where: str) -> str:
    """The non-empty, valid Unicode text at obj[key]."""
    value = field(obj, key, str, where)
    check_unicode(value, f"{where}: the {key}")
    if not value.strip():
        raise LoraftError(f"{where}: the {key} is empty")
    return value
