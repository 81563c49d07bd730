import numpy as np
import pytest
from gguf import GGUFWriter

from .helpers import assert_clear_error, loraft


def test_models_lists_names_and_counts():
    result = loraft("models")
    assert result.returncode == 0
    assert "smollm2-135m" in result.stdout and "134,515,008" in result.stdout
    assert "gpt2-xl" in result.stdout and "163,037,184" in result.stdout


def test_generate_from_a_gguf_path(smollm2_gguf):
    result = loraft(
        "generate", "--model", str(smollm2_gguf), "--prompt", "The capital of France is", "--max-new-tokens", "3"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The capital of France is Paris")


def test_unknown_model_lists_the_valid_ones():
    assert_clear_error(loraft("generate", "--model", "gpt5", "--prompt", "x"), "gpt5", "smollm2-135m", "gpt2-medium")


def test_missing_weights(tmp_path):
    missing = tmp_path / "nothing-here"
    assert_clear_error(
        loraft("generate", "--model", "gpt2-small", "--weights", str(missing), "--prompt", "x"), str(missing)
    )


@pytest.mark.parametrize("content", [b"", b"\x00" * 100, b'{"not": "a header"}' * 10], ids=["empty", "zeros", "json"])
def test_corrupt_weights(tmp_path, content):
    file = tmp_path / "model.safetensors"
    file.write_bytes(content)
    assert_clear_error(
        loraft("generate", "--model", "gpt2-small", "--weights", str(file), "--prompt", "x"), "safetensors"
    )


def test_gguf_of_unsupported_architecture(tmp_path):
    path = tmp_path / "other.gguf"
    writer = GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_clear_error(loraft("generate", "--model", str(path), "--prompt", "x"), "mamba", "not supported")


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 64)
    assert_clear_error(loraft("generate", "--model", str(path), "--prompt", "x"), "GGUF")


def test_compiling_by_default_only_where_it_pays(smollm2_gguf, monkeypatch):
    """Llama blocks on a CPU (their elementwise chains fuse), not GPT-2's (one kernel each already);
    --compile and --no-compile decide."""
    from loraft import train
    from loraft.cli import parser, train_options

    def compiles(*flags):
        return train_options(parser().parse_args(["train", "--device", "cpu", *flags]))["train"].compile

    a_gguf = smollm2_gguf  # a GGUF file's family is read from its metadata
    monkeypatch.setattr(train, "compiler_found", lambda: True)
    assert compiles("--model", "smollm2-135m") and compiles("--model", str(a_gguf))
    assert not compiles("--model", "gpt2-small")
    assert compiles("--model", "gpt2-small", "--compile")
    assert not compiles("--model", "smollm2-135m", "--no-compile")
    monkeypatch.setattr(train, "compiler_found", lambda: False)
    assert not compiles("--model", "smollm2-135m")
