"""The PEFT article's recipe (LoRA r=16, alpha=32, dropout 0.05 on the attention's q, k, v over an 8-bit
frozen base; the ### CONTEXT / ### QUESTION / ### ANSWER layout; 100 steps, here of 4 x 4 examples at
lr 1e-3, as in README's BLOOM command) on what can be had offline: SmolLM2-135M-Instruct, on a SQuAD v2.0-format file built from the book's
instruction examples that have an input (the input as the context, the instruction as the question,
the output as the answer: 325 questions, split 85/10/5 by question).

    LORAFT_DATA_DIR=../shared/data python benchmarks/squad_article.py            # ~10 min on 2 cores
    python benchmarks/squad_article.py --model bloom-560m --targets query_key_value   # the article's model

Extra arguments are `loraft instruct` flags, put after the recipe's (the last of a flag given twice
wins). Prints and writes the test loss and SQuAD's exact match and F1 before and after training to
benchmarks/results/squad_article_<model>.json; the run folder is runs/squad-article-<model>.
"""

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from loraft.data.instruction import book_file

RECIPE = (
    "--model smollm2-135m --quantize int8 --rank 16 --alpha 32 --dropout 0.05 --targets q k v "
    "--format squad --template qa --max-steps 100 --batch-size 4 --grad-accum 4 --lr 1e-3 "
    "--eval-every 20 --max-length 512 --max-new-tokens 64 --overwrite --quiet"
).split()


def squad_from_instructions(out: Path) -> int:
    """The book's examples with an input as one SQuAD v2.0 article, one paragraph per question (its
    answer_start -1 where the answer is not a span of the context, as most are not)."""
    examples = [e for e in json.loads(book_file().read_text(encoding="utf-8")) if e["input"].strip()]
    paragraphs = [
        {
            "context": e["input"],
            "qas": [
                {
                    "id": f"book-{i}",
                    "question": e["instruction"],
                    "answers": [{"text": e["output"], "answer_start": e["input"].find(e["output"])}],
                    "is_impossible": False,
                }
            ],
        }
        for i, e in enumerate(examples)
    ]
    squad = {
        "version": "v2.0",
        "data": [{"title": "LLMs-from-scratch ch07 instruction data", "paragraphs": paragraphs}],
    }
    out.write_text(json.dumps(squad, ensure_ascii=False, indent=1), encoding="utf-8")
    return len(paragraphs)


def main():
    extra = sys.argv[1:]
    model = next((extra[i + 1] for i in range(len(extra) - 1) if extra[i] == "--model"), "smollm2-135m")
    name = Path(model).name.removesuffix(".gguf")
    run = Path("runs") / f"squad-article-{name}"
    data = Path("runs") / "instruction-qa-v2.0.json"
    data.parent.mkdir(exist_ok=True)
    questions = squad_from_instructions(data)
    started = time.perf_counter()
    command = ["loraft", "instruct", "--data", str(data), "--out", str(run), *RECIPE, *extra]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    report = json.loads((run / "report.json").read_text())
    responses = json.loads((run / "test-responses.json").read_text())
    result = {
        "machine": platform.processor() or platform.machine(),
        "command": command,
        "questions": questions,
        "sizes": report["sizes"],
        **{
            f"test_{key}_{when}": report[f"test_{key}_{when}"]
            for key in ("loss", "perplexity")
            for when in ("before", "after")
        },
        "answers_before": report["answers_before"],
        "answers_after": report["answers_after"],
        "parameters": report["parameters"],
        "adapter_bytes": report["adapter_bytes"],
        "train_seconds": report["train_seconds"],
        "wall_seconds": time.perf_counter() - started,
        "examples": responses[:3],
    }
    out = Path(__file__).parent / "results" / f"squad_article_{name}.json"
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    before, after = report["answers_before"], report["answers_after"]
    print(
        f"{questions} questions {report['sizes']}; test loss {report['test_loss_before']:.3f} -> "
        f"{report['test_loss_after']:.3f}; exact match {before['exact_match']:.3f} -> {after['exact_match']:.3f}; "
        f"F1 {before['f1']:.3f} -> {after['f1']:.3f}; {result['wall_seconds']:.0f} s; {out}"
    )


if __name__ == "__main__":
    main()
