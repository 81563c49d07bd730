"""Metrics: classification, and scores of generated answers against expected ones."""

import re
import string
from collections import Counter


def classification_metrics(labels: list[int], predictions: list[int], label_names: list[str]) -> dict:
    """Accuracy, a confusion matrix (rows: true, columns: predicted), and precision, recall and F1
    per class, macro-averaged, and for binary tasks those of the second class (e.g. spam)."""
    n = len(label_names)
    confusion = [[0] * n for _ in range(n)]
    for truth, guess in zip(labels, predictions):
        confusion[truth][guess] += 1
    per_class = {}
    for c, name in enumerate(label_names):
        tp = confusion[c][c]
        predicted = sum(confusion[r][c] for r in range(n))
        actual = sum(confusion[c])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    metrics = {
        "accuracy": sum(confusion[c][c] for c in range(n)) / max(1, len(labels)),
        "count": len(labels),
        "macro_f1": sum(m["f1"] for m in per_class.values()) / n,
        "per_class": per_class,
        "confusion_matrix": confusion,
    }
    if n == 2:
        metrics |= {k: per_class[label_names[1]][k] for k in ("precision", "recall", "f1")}
    return metrics


# ---------------------------------------------------------------- generated answers


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation, as its official evaluation scripts (v1.1 and v2.0) define it: lower case,
    ASCII punctuation deleted (so "it's" is "its"; other marks stay), the words a, an and the removed,
    whitespace collapsed."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD's F1: the normalised words both share (with repeats), over each one's word count; where
    either has no word (an unanswerable question's empty answer), 1 if both have none, else 0."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of the two word sequences (lower case, letters and
    digits only, as the rouge-score package tokenises), over their lengths."""
    pred, ref = (re.findall(r"[a-z0-9]+", text.lower()) for text in (prediction, reference))
    if not pred or not ref:
        return 0.0
    row = [0] * (len(ref) + 1)  # LCS lengths of pred[:i] against every prefix of ref
    for word in pred:
        diagonal = 0
        for j, other in enumerate(ref, 1):
            diagonal, row[j] = row[j], diagonal + 1 if word == other else max(row[j], row[j - 1])
    common = row[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_scores(predictions: list[str], golds: list[list[str]]) -> dict:
    """Mean SQuAD exact match (normalised), SQuAD token F1 and ROUGE-L F1 of generated answers, each
    the best over a question's gold answers, as SQuAD scores a question with several."""
    n = max(1, len(golds))

    def mean(score) -> float:
        return sum(max(score(p, gold) for gold in answers) for p, answers in zip(predictions, golds)) / n

    return {
        "exact_match": mean(lambda p, gold: float(normalize_answer(p) == normalize_answer(gold))),
        "f1": mean(token_f1),
        "rouge_l": mean(rouge_l),
        "count": len(golds),
    }
