"""The classification job, from data to a tested, saved adapter: text classification (the SMS spam
classifier is the default) with LoRA or one of the book's baselines."""

from dataclasses import dataclass

from torch import nn

from . import lora
from .adapters import read_adapter
from .classifier import ClassificationTask, TextFormat, add_classification_head, evaluate_split
from .data.classification import ClassificationData, load_classification_data
from .data.sms_spam import load_sms_spam
from .errors import LoraftError
from .inference import compile_for_inference
from .job import load_trained, run_job
from .models import DEFAULT_MODEL
from .precision import uses_bf16
from .train import TrainConfig

METHODS = ("lora", "full", "last-block", "last-two-blocks", "head")


def load_data(
    data: str,
    data_file=None,
    text_column="text",
    label_column="label",
    val_file=None,
    test_file=None,
    seed=123,
    data_from_uci=False,
) -> ClassificationData:
    if data == "sms-spam":
        return load_sms_spam(data_file, data_from_uci)
    return load_classification_data(data, text_column, label_column, val_file, test_file, seed)


def prepare_model(model: nn.Module, method: str, num_classes: int, lora_config: lora.LoraConfig):
    """Make `method`'s parameters the trainable ones: LoRA matrices, or (baselines) base blocks."""
    if method not in METHODS:
        raise LoraftError(f"unknown --method {method!r}; choose one of {METHODS}")
    if method == "lora":
        lora.apply_lora(model, lora_config)
    add_classification_head(model, num_classes)
    trained_blocks = {"full": len(model.trf_blocks), "last-block": 1, "last-two-blocks": 2}.get(method, 0)
    if trained_blocks:
        chosen = [model.trf_blocks[-i] for i in range(1, trained_blocks + 1)] + [model.final_norm]
        if method == "full":
            chosen = [model]
        for module in chosen:
            for param in module.parameters():
                param.requires_grad_(True)
        for name, param in model.named_parameters():  # a tied head is listed once, as the embedding
            if name.startswith("out_head.original."):  # the LM head: a classifier never runs it
                param.requires_grad_(False)
    adapter = {id(p) for p in lora.adapter_params(model, "default").values()}
    lora.adapter_state(model).configs["default"]["trained_parameters"] = [
        name for name, p in model.named_parameters() if p.requires_grad and id(p) not in adapter
    ]


@dataclass
class ClassificationJob:
    """What the job skeleton (job.py) needs to train a classifier of `data`."""

    data: ClassificationData
    fmt: TextFormat
    method: str
    name = "classification"

    def check(self, model, tokenizer):
        if self.fmt.max_length > model.context_length:
            raise LoraftError(
                f"--max-length {self.fmt.max_length} exceeds {model.name}'s context length {model.context_length}"
            )

    def prepare(self, model, lora_config):
        prepare_model(model, self.method, len(self.data.label_names), lora_config)

    def casts_base(self) -> bool:
        return self.method in ("lora", "head")  # the baselines train base weights, in fp32

    def trainer_task(self, tokenizer, cfg: TrainConfig):
        return ClassificationTask(tokenizer, self.data, self.fmt, cfg.seed, cfg.bf16)

    def adapter_meta(self, cfg: TrainConfig) -> dict:
        labels = self.data.label_names
        return dict(task=self.name, label_names=labels, **self.fmt.as_dict(), method=self.method, seed=cfg.seed)

    def measure(self, model, tokenizer, cfg: TrainConfig, before: dict | None) -> dict:
        def evaluate(split: str) -> dict:
            return evaluate_split(
                model, tokenizer, getattr(self.data, split), self.data.label_names, self.fmt, cfg.bf16
            )

        if before is None:
            return {split: evaluate(split)["accuracy"] for split in ("val", "test")}
        return {split: evaluate(split) for split in ("train", "val", "test")}

    def report(self, before: dict, after: dict) -> dict:
        return {
            "method": self.method,
            "sizes": self.data.sizes(),
            "label_names": self.data.label_names,
            "accuracy_before": before,
            **{f"{split}_accuracy": result["accuracy"] for split, result in after.items()},
            "test": after["test"],
            "val": after["val"],
        }

    def files(self, before: dict, after: dict) -> dict:
        return {}

    def describe(self, before: dict, after: dict | None) -> str:
        if after is None:
            return (
                f"method {self.method}; data {self.data.sizes()}; "
                f"accuracy before training: val {before['val']:.3f}, test {before['test']:.3f}"
            )
        accuracy = {split: result["accuracy"] for split, result in after.items()}
        return f"test accuracy {accuracy['test']:.4f} (val {accuracy['val']:.4f}, train {accuracy['train']:.4f})"


def train_classifier(
    out="runs/sms-spam",
    model=DEFAULT_MODEL,
    weights=None,
    data="sms-spam",
    data_file=None,
    data_from_uci=False,
    text_column="text",
    label_column="label",
    val_file=None,
    test_file=None,
    method="lora",
    lora_config: lora.LoraConfig | None = None,
    max_length=128,
    pooling="last",
    template="{text}",
    resume=False,
    overwrite=False,
    quiet=False,
    train: TrainConfig | None = None,
) -> dict:
    """Fine-tune `model` into a classifier of `data`; write the adapter, metrics, report and plots to `out`."""
    lora_config = lora_config or lora.LoraConfig()
    options = {k: v for k, v in locals().items() if k not in ("train", "lora_config")} | lora_config.as_dict()
    plain = lora.LoraConfig()
    if method != "lora" and (lora_config.variant, lora_config.init, lora_config.lora_plus_ratio) != (
        plain.variant,
        plain.init,
        plain.lora_plus_ratio,
    ):
        raise LoraftError(
            f"--variant, --init and --lora-plus-ratio shape a LoRA: they need --method lora, not {method}"
        )
    fmt = TextFormat(template, max_length, pooling)
    seed = (train or TrainConfig()).seed
    dataset = load_data(data, data_file, text_column, label_column, val_file, test_file, seed, data_from_uci)
    job = ClassificationJob(dataset, fmt, method)
    report = run_job(job, options, out, model, weights, lora_config, resume, overwrite, quiet, train)
    return report and {"model": model, "data": data, **report}


def evaluate_adapter(
    adapter_dir,
    data="sms-spam",
    data_file=None,
    text_column="text",
    label_column="label",
    split="test",
    weights=None,
    quantize="none",
    data_from_uci=False,
    compile: bool | None = None,
) -> dict:
    """Metrics of a classification adapter on a split of `data` (the split it was trained with, when
    the seed is the default) or on all of it; `compile`: see inference.compile_for_inference."""
    from .data.classification import Split, encode_labels, read_labelled_texts, split_by_fractions
    from .data.sms_spam import book_split, read_sms_spam, sms_spam_file

    meta, _ = read_adapter(adapter_dir)
    names = meta.get("label_names", [])
    if data == "sms-spam":
        texts, labels = read_sms_spam(sms_spam_file(data_file, data_from_uci))
        if names != ["ham", "spam"]:
            raise LoraftError(f"{adapter_dir} classifies {names}, not the SMS labels ['ham', 'spam']")
        dataset = book_split(texts, labels)
        whole = Split(texts, labels)
    else:
        texts, raw = read_labelled_texts(data, text_column, label_column)
        whole = Split(texts, encode_labels(data, raw, names))
        parts = split_by_fractions(whole, (0.1, 0.2), meta.get("seed", 123))  # the split the run made
        dataset = ClassificationData(*parts, names)
    chosen = whole if split == "all" else getattr(dataset, split)
    model, tokenizer, meta = load_trained(adapter_dir, "classification", weights, quantize)
    compile_for_inference(model, len(chosen.texts), compile)
    return {
        "adapter": str(adapter_dir),
        "data": data,
        "split": split,
        **evaluate_split(model, tokenizer, chosen, names, TextFormat.of_adapter(meta), uses_bf16(model)),
    }
