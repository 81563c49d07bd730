"""Hostile adapter folders, loraft's and PEFT's: a real adapter's files edited at random (keys removed,
values replaced, tensors dropped, reshaped, retyped or poisoned, bytes cut or flipped). Each either
loads, and the model runs with what the file holds, or fails with one LoraftError line, leaving the
model as it was and no partial output folder. (A flipped bit in a tensor's data can make a huge but
finite weight: no reader can tell that from a trained one.)"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from loraft import lora
from loraft.adapters import CONFIG_FILE, WEIGHTS_FILE, load_adapter, save_adapter
from loraft.errors import LoraftError
from loraft.models import load_model
from loraft.peft_format import export_peft, import_peft

from .helpers import IDS, assert_clear_error, loraft, tiny_llama, train_a_few_steps

PROPERTY = settings(
    max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"

MODULES = [
    "trf_blocks.0.att.W_query",
    "trf_blocks.1.ff.fc3",
    "trf_blocks.0.att",
    "trf_blocks.7.att.W_query",
    "out_head",
    "tok_emb",
    "final_norm",
    "nope",
    "",
    "base_model.model.model.layers.0.self_attn.q_proj",
    "model.layers.1.mlp.down_proj",
    "score",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.sampled_from([0.0, 0.5, 1e30, -1.0, 1e-30]),
    st.sampled_from(["lora", "standard", "rslora", "book", "dora", "llama", "classification", "CAUSAL_LM", "SEQ_CLS"]),
    st.sampled_from(MODULES),
)
SPEC = st.fixed_dictionaries(
    {
        "in_features": st.sampled_from([48, 47, 0, "48"]),
        "out_features": st.sampled_from([2, 3, 0]),
        "bias": st.booleans(),
    }
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(st.sampled_from(MODULES), max_size=4),
        st.dictionaries(st.sampled_from(MODULES), st.one_of(SPEC, inner), max_size=3),
    ),
    max_leaves=6,
)


def json_edit(keys):
    """One edit of a JSON object: a key removed, or set to a value (a new key, or a known one)."""
    key = st.one_of(st.sampled_from(keys), st.text(max_size=8))
    return st.one_of(st.tuples(st.just("remove"), key), st.tuples(st.just("set"), key, JSON_VALUES))


TENSOR_EDIT = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 99)),
    st.tuples(st.just("reshape"), st.integers(0, 99), st.integers(0, 2)),
    st.tuples(st.just("retype"), st.integers(0, 99), st.sampled_from([torch.float16, torch.bfloat16, torch.int64])),
    st.tuples(st.just("poison"), st.integers(0, 99), st.sampled_from([float("nan"), float("inf"), -float("inf")])),
    st.tuples(st.just("rename"), st.integers(0, 99), st.sampled_from(MODULES)),
)
BYTE_EDIT = st.one_of(
    st.tuples(st.just("cut"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
)


def edit_json(path: Path, edits):
    meta = json.loads(path.read_text())
    for edit in edits:
        if edit[0] == "remove":
            meta.pop(edit[1], None)
        else:
            meta[edit[1]] = edit[2]
    path.write_text(json.dumps(meta))


def edit_tensors(path: Path, edits):
    tensors = load_file(path)
    for op, index, *arg in edits:
        if not tensors:
            break
        key = sorted(tensors)[index % len(tensors)]
        if op == "drop":
            del tensors[key]
        elif op == "reshape":  # one row or column fewer, the rows and columns swapped, or flat
            t = tensors[key]
            tensors[key] = [t[..., :-1], t.t() if t.dim() == 2 else t, t.flatten()][arg[0]].contiguous()
        elif op == "retype":
            tensors[key] = tensors[key].to(arg[0])
        elif op == "poison" and tensors[key].is_floating_point():
            tensors[key] = tensors[key].clone()
            tensors[key].view(-1)[0] = arg[0]
        else:
            tensors[f"{arg[0]}.{key.rsplit('.', 1)[-1]}"] = tensors.pop(key)
    save_file(tensors, path)


def edit_bytes(path: Path, edits):
    data = bytearray(path.read_bytes())
    for op, where, *arg in edits:
        at = int(where * (len(data) - 1)) if data else 0
        if op == "cut":
            del data[at:]
        elif data:
            data[at] ^= arg[0]
    path.write_bytes(bytes(data))


def damaged_copy(original: Path, folder: Path, config_file: str, weights_file: str, data) -> Path:
    """A copy of `original` with one to three edits, each of adapter.json, the tensors or their bytes."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(original, folder)
    keys = sorted(json.loads((original / config_file).read_text()))
    target = data.draw(st.sampled_from(["json", "tensors", "bytes", "json bytes"]))
    if target == "json":
        edit_json(folder / config_file, data.draw(st.lists(json_edit(keys), min_size=1, max_size=3)))
    elif target == "tensors":
        edit_tensors(folder / weights_file, data.draw(st.lists(TENSOR_EDIT, min_size=1, max_size=3)))
    else:
        file = config_file if target == "json bytes" else weights_file
        edit_bytes(folder / file, data.draw(st.lists(BYTE_EDIT, min_size=1, max_size=2)))
    return folder


def pristine(model: nn.Module) -> tuple:
    """What a failed load must leave as it was: every module's type, every tensor, the adapters."""
    return (
        [(name, type(m)) for name, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        lora.adapter_names(model),
    )


def assert_loads_or_refuses(load, model: nn.Module, weights_file: Path | None = None):
    """`load(model)` either refuses with one line and leaves `model` as it was, or loads: the model
    runs, and holds exactly the tensors of `weights_file` (a loraft adapter's), if given."""
    before = pristine(model)
    try:
        load(model)
    except LoraftError as e:
        assert "\n" not in str(e), str(e)
        after = pristine(model)
        assert after[0] == before[0] and after[2] == before[2]
        assert after[1].keys() == before[1].keys()
        assert all(torch.equal(after[1][k], before[1][k]) for k in before[1])
        return
    with torch.no_grad():
        assert model(IDS).shape[:2] == IDS.shape
    if weights_file is not None:
        saved = load_file(weights_file)
        (name,) = lora.adapter_names(model)
        assert all(torch.equal(p, saved[key].float()) for key, p in lora.adapter_params(model, name).items())


@pytest.fixture(scope="module")
def classifier_adapter(tmp_path_factory):
    """A trained Llama classifier adapter: LoRA on every linear layer and a new two-class head."""
    model = tiny_llama()
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8))
    lora.add_module_to_save(model, "out_head", nn.Linear(48, 2, bias=False))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lora.adapter_parameters(model):
            p.normal_(std=0.05)
    folder = tmp_path_factory.mktemp("adapters")
    save_adapter(model, folder / "loraft", task="classification", label_names=["ham", "spam"], max_length=32)
    export_peft(folder / "loraft", folder / "peft")
    return folder


@PROPERTY
@given(data=st.data())
def test_a_damaged_adapter_folder_loads_or_fails_cleanly(classifier_adapter, tmp_path, data):
    folder = damaged_copy(classifier_adapter / "loraft", tmp_path / "adapter", CONFIG_FILE, WEIGHTS_FILE, data)
    assert_loads_or_refuses(lambda model: load_adapter(model, folder), tiny_llama(), folder / WEIGHTS_FILE)


@PROPERTY
@given(data=st.data())
def test_a_damaged_peft_folder_imports_or_fails_cleanly(classifier_adapter, tmp_path, data):
    folder = damaged_copy(classifier_adapter / "peft", tmp_path / "peft", PEFT_CONFIG, PEFT_WEIGHTS, data)
    assert_loads_or_refuses(lambda model: import_peft(folder, model), tiny_llama())


def test_the_undamaged_folders_load(classifier_adapter):
    """The properties' starting points are good adapters: both load, and give the same logits."""
    ours, theirs = tiny_llama(), tiny_llama()
    load_adapter(ours, classifier_adapter / "loraft")
    import_peft(classifier_adapter / "peft", theirs)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), theirs(IDS))


def test_import_peft_leaves_no_partial_out_folder(tiny_gpt2_weights, tmp_path):
    """`loraft import-peft` of a PEFT folder whose weights are cut short fails with one line and leaves no
    --out folder; the same folder intact imports."""
    model, _ = load_model("gpt2-small", str(tiny_gpt2_weights))
    lora.apply_lora(model, lora.LoraConfig(rank=2, targets=("attention",)))
    train_a_few_steps(model, IDS)
    save_adapter(model, tmp_path / "loraft")
    export_peft(tmp_path / "loraft", tmp_path / "peft")
    flags = ["--peft", str(tmp_path / "peft"), "--model", "gpt2-small", "--weights", str(tiny_gpt2_weights)]
    assert loraft("import-peft", *flags, "--out", str(tmp_path / "whole")).returncode == 0
    assert (tmp_path / "whole" / CONFIG_FILE).is_file()
    weights = tmp_path / "peft" / PEFT_WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_clear_error(loraft("import-peft", *flags, "--out", str(tmp_path / "cut")), PEFT_WEIGHTS)
    assert not (tmp_path / "cut").exists()
