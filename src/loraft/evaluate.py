"""Classification metrics."""


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

