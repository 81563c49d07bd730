"""`loraft sweep` end to end on a tiny random GPT-2 and real SMS data: a 2 x 1 grid, its CSV, table and
plot, and an interrupted sweep continuing where it stopped."""

import csv
import json

import matplotlib.image

from .helpers import assert_clear_error, loraft


def sweep_args(weights, data, out, *extra):
    return [
        "sweep",
        "--model",
        "gpt2-small",
        "--weights",
        str(weights),
        "--data",
        str(data),
        "--out",
        str(out),
        "--ranks",
        "2,4",
        "--alphas",
        "8",
        "--epochs",
        "2",
        "--eval-every",
        "4",
        "--no-compile",
        *extra,
    ]


def test_sweep_writes_csv_table_and_plot_and_continues(tmp_path, tiny_gpt2_weights, small_sms_tsv):
    out = tmp_path / "sweep"
    first = loraft(*sweep_args(tiny_gpt2_weights, small_sms_tsv, out))
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("(trained)") == 2

    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["rank"], r["alpha"]) for r in rows] == [("2", "8.0"), ("4", "8.0")]
    for row in rows:
        run = out / f"rank{row['rank']}-alpha8"
        report = json.loads((run / "report.json").read_text())
        assert float(row["test_accuracy"]) == report["test_accuracy"]
        assert int(row["adapter_bytes"]) == (run / "adapter" / "adapter.safetensors").stat().st_size
        assert 0 < float(row["wall_seconds"]) == round(report["wall_seconds"], 1)
    # The 64 x 2 head, and LoRA A and B on 6 linears per block (4 of 64 -> 64, 64 -> 256, 256 -> 64), 2 blocks.
    lora_params = [int(r["trainable_parameters"]) - 64 * 2 for r in rows]
    assert lora_params == [rank * 2 * (4 * (64 + 64) + (64 + 256) + (256 + 64)) for rank in (2, 4)]

    table = (out / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| rank | alpha | test accuracy |") and len(table) == 4
    assert table[2].startswith(f"| 2 | 8 | {100 * float(rows[0]['test_accuracy']):.2f}% |")
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(out / "sweep.png").shape[:2] == (780, 1080)

    # Interrupted after rank 2, during rank 4's final evaluation: the same command skips the first and
    # resumes the second from its checkpoint, to the same result.
    (out / "rank4-alpha8" / "report.json").unlink()
    again = loraft(*sweep_args(tiny_gpt2_weights, small_sms_tsv, out))
    assert again.returncode == 0, again.stderr
    assert "(done earlier)" in again.stdout and "(resumed)" in again.stdout
    with open(out / "sweep.csv", newline="") as f:
        rows_again = list(csv.DictReader(f))
    assert rows_again[0] == rows[0] and rows_again[1]["test_accuracy"] == rows[1]["test_accuracy"]

    assert_clear_error(
        loraft(*sweep_args(tiny_gpt2_weights, small_sms_tsv, out, "--lr", "5e-4")),
        "other settings",
        "'lr': (0.001, 0.0005)",
    )
    assert_clear_error(
        loraft(*sweep_args(tiny_gpt2_weights, small_sms_tsv, tmp_path / "bad", "--ranks", "4,x")),
        "--ranks takes comma-separated numbers",
    )
    assert_clear_error(
        loraft(*sweep_args(tiny_gpt2_weights, small_sms_tsv, tmp_path / "bad", "--alphas", "8,8")),
        "positive and distinct",
    )
    assert not (tmp_path / "bad").exists()
