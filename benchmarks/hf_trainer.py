"""The transformers Trainer settings the training benchmarks share: loraft's hyperparameters (AdamW
lr 1e-3, cosine schedule, no weight decay, clipping 1.0), on the CPU, with nothing saved or evaluated
inside the timed loop. `tuned`: bf16 autocast and length-grouped batches instead of the defaults."""


def trainer_arguments(out: str, tuned: bool, **fields):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=tuned,
        use_cpu=True,
        seed=123,
        train_sampling_strategy="group_by_length" if tuned else "random",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        **fields,
    )
