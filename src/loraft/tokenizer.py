"""Tokenizers: GPT-2's BPE through tiktoken, and any byte-level BPE described inside a GGUF file
(SmolLM2's) through Hugging Face `tokenizers`."""

from pathlib import Path

import tiktoken
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .errors import LoraftError
from .files import checked_file, data_dir


def check_unicode(text: str, where: str = "the text"):
    """Refuse a lone surrogate: it is not Unicode text (tiktoken would silently replace it, `tokenizers`
    fails with a TypeError). Python turns each byte of argv that is not UTF-8 into one (surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        byte = f", often a byte 0x{code - 0xDC00:02x} that is not UTF-8" if 0xDC80 <= code <= 0xDCFF else ""
        raise LoraftError(
            f"{where}, character {e.start + 1}: not valid Unicode (the lone surrogate U+{code:04X}{byte}); give UTF-8 text"
        ) from None


def check_texts(texts: list[str]) -> list[str]:
    for number, text in enumerate(texts, 1):
        check_unicode(text, f"text {number}")
    return texts


class GPT2Tokenizer:
    name = "gpt2"
    chat_template = None

    def __init__(self):
        self.encoding = gpt2_encoding()
        self.eos_id = self.pad_id = self.encoding.eot_token
        self.vocab_size = self.encoding.n_vocab

    # Special tokens written in the text (<|endoftext|>) are read as such, as in `tokenizers`.
    def encode(self, text: str) -> list[int]:
        check_unicode(text)
        return self.encoding.encode(text, allowed_special="all")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_batch(check_texts(texts), allowed_special="all")

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)


# OpenAI's two GPT-2 BPE files as they are, inside the package (Modified MIT; LICENSE.txt beside them),
# and their sha256: the files tiktoken downloads for get_encoding("gpt2").
GPT2_FILES = Path(__file__).parent / "data" / "gpt2_tokenizer"
GPT2_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's "gpt2" built from OpenAI's two files: those in $LORAFT_DATA_DIR/gpt2_tokenizer when
    there, else the copy inside the package (no network), each sha256-checked."""
    from tiktoken_ext import openai_public

    local = data_dir() / "gpt2_tokenizer" if data_dir() else None
    if local and (local / "vocab.bpe").is_file():
        folder, advice = local, "put OpenAI's files there, or unset LORAFT_DATA_DIR to use the copy inside the package"
    else:
        folder, advice = GPT2_FILES, "reinstall loraft"
    for name, sha256 in GPT2_SHA256.items():
        checked_file(folder / name, sha256, f"GPT-2 BPE file {name}", advice)
    try:  # tiktoken copies the files it reads into its cache (TIKTOKEN_CACHE_DIR, else the temporary folder)
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(folder / "vocab.bpe"),
            encoder_json_file=str(folder / "encoder.json"),
            vocab_bpe_hash=GPT2_SHA256["vocab.bpe"],
            encoder_json_hash=GPT2_SHA256["encoder.json"],
        )
    except OSError as e:
        raise LoraftError(
            f"could not read the GPT-2 BPE files in {folder} through tiktoken's cache ({e.strerror or e}); "
            f"set TIKTOKEN_CACHE_DIR to a writable folder, or to an empty value to turn tiktoken's cache off"
        ) from None
    return tiktoken.Encoding(
        "gpt2",
        pat_str=openai_public.r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
        explicit_n_vocab=50257,
    )


# How llama.cpp splits text before BPE, by the GGUF's `tokenizer.ggml.pre`. "smollm" isolates every
# digit first, then applies GPT-2's split (llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM, and the
# Digits + ByteLevel pre-tokenizer of SmolLM2's own tokenizer.json).
PRE_TOKENIZERS = {
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
}
CONTROL_TOKEN = 3  # llama.cpp's token type of special tokens such as <|im_start|>


class GGUFTokenizer:
    """A byte-level BPE tokenizer rebuilt from a GGUF file's metadata (tokens, merges, special tokens)."""

    def __init__(self, meta: dict):
        if meta.get("tokenizer.ggml.model") != "gpt2":
            raise LoraftError(
                f"unsupported GGUF tokenizer {meta.get('tokenizer.ggml.model')!r}: loraft reads byte-level BPE ('gpt2')"
            )
        pre = meta.get("tokenizer.ggml.pre", "gpt2")
        if pre not in PRE_TOKENIZERS:
            raise LoraftError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {sorted(PRE_TOKENIZERS)}")
        tokens = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False))
        tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
        tok.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type", [])
        tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL_TOKEN]
        )
        self.tokenizer = tok
        self.name = meta.get("general.name", "gguf")
        self.vocab_size = len(tokens)
        self.eos_id = meta["tokenizer.ggml.eos_token_id"]
        self.pad_id = meta.get("tokenizer.ggml.padding_token_id", self.eos_id)
        self.bos_id = meta.get("tokenizer.ggml.bos_token_id")
        self.chat_template = meta.get("tokenizer.chat_template")

    def encode(self, text: str) -> list[int]:
        check_unicode(text)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(check_texts(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)
