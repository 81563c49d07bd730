"""`loraft serve` refuses, with one clear line and before serving anything, adapters it cannot serve."""

import json
import shutil
import socket

import pytest

from loraft.errors import LoraftError
from loraft.serve.registry import check_adapters, load_served, parse_adapter_specs

from ..helpers import assert_clear_error, loraft


@pytest.mark.parametrize(
    "specs, message",
    [
        (["spam"], "expected NAME=DIR"),
        (["spam="], "expected NAME=DIR"),
        (["=runs/adapter"], "a name is letters"),
        (["my spam=runs/adapter"], "a name is letters"),
        (["spam=a", "spam=b"], "'spam' is given twice"),
    ],
)
def test_bad_adapter_specs(specs, message):
    with pytest.raises(LoraftError, match=message):
        parse_adapter_specs(specs)


def test_no_adapter_needs_the_base_model():
    with pytest.raises(LoraftError, match="give the base model with --model, or at least one --adapter NAME=DIR"):
        load_served({})


def edited_copy(folder, to, **changes):
    shutil.copytree(folder, to)
    meta = json.loads((to / "adapter.json").read_text())
    (to / "adapter.json").write_text(json.dumps({**meta, **changes}))
    return to


def test_adapters_that_cannot_share_the_base(reference, tmp_path):
    good = reference[1]["mood"]
    cases = {
        "not found": ({"a": tmp_path / "missing"}, "adapter folder not found"),
        "not an adapter": ({"a": tmp_path}, "is not a loraft adapter folder"),
        "no task": ({"a": edited_copy(good, tmp_path / "no-task", task=None)}, "has task None"),
        "full fine-tuning": (
            {"a": edited_copy(good, tmp_path / "full", method="full", trained_parameters=["final_norm.weight"])},
            "'a' (" + str(tmp_path / "full") + ") changes the base weights (method 'full')",
        ),
        "other base": (
            {"a": good, "b": edited_copy(good, tmp_path / "gpt2", base_model="gpt2-small")},
            "all adapters must share one base model; these were trained on different ones (a: smollm2-135m, b: gpt2-small)",
        ),
    }
    for folders, message in cases.values():
        with pytest.raises(LoraftError) as error:
            check_adapters(folders)
        assert message in str(error.value)


def test_cli_refuses_an_adapter_for_other_base_weights(reference, tmp_path):
    """Same base name, other weights: found when the adapter is put on the loaded base."""
    other = edited_copy(reference[1]["mood"], tmp_path / "other", base_fingerprint="0123456789abcdef")
    result = loraft("serve", "--adapter", f"spam={reference[1]['spam']}", "--adapter", f"other={other}", "--port", "0")
    assert_clear_error(result, "other weights than the loaded smollm2-135m")


def test_cli_refuses_a_bad_spec_and_a_busy_port():
    assert_clear_error(loraft("serve", "--adapter", "spam"), "--adapter 'spam': expected NAME=DIR")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_clear_error(
            loraft("serve", "--adapter", "spam=x", "--port", str(port)), f"cannot listen on 127.0.0.1:{port}"
        )
