"""loraft: LoRA fine-tuning of small pretrained language models."""

__version__ = "0.1.0"
