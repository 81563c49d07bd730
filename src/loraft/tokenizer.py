"""Tokenizers: GPT-2's BPE through tiktoken, and the two kinds of BPE a GGUF file or a Hugging Face
tokenizer.json describes, through Hugging Face `tokenizers`: byte-level BPE (GPT-2's, SmolLM2's, Llama 3's,
Qwen's) and SentencePiece's BPE with byte fallback (Gemma's, Llama 2's, Phi-3's)."""

import json
import re
from pathlib import Path

import tiktoken
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from .errors import LoraftError
from .files import checked_file, data_dir, read_json, write_json


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
    bos_prefix: list[int] = []  # GPT-2 starts a text with nothing

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

    def as_tokenizers(self) -> HFTokenizer:
        """The same tokenizer in the `tokenizers` library, from the same two files: GPT-2's tokenizer.json."""
        folder = gpt2_files()
        merges = (folder / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]  # after a version line
        bpe = models.BPE(vocab=read_json(folder / "encoder.json"), merges=[tuple(m.split()) for m in merges if m])
        tok = HFTokenizer(bpe)
        tok.pre_tokenizer = PRE_TOKENIZERS["gpt2"]()
        tok.decoder = decoders.ByteLevel()
        tok.add_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
        return tok


# OpenAI's two GPT-2 BPE files as they are, inside the package (Modified MIT; LICENSE.txt beside them),
# and their sha256: the files tiktoken downloads for get_encoding("gpt2").
GPT2_FILES = Path(__file__).parent / "data" / "gpt2_tokenizer"
GPT2_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def gpt2_files() -> Path:
    """The folder of OpenAI's two files: $LORAFT_DATA_DIR/gpt2_tokenizer when there, else the copy inside
    the package (no network), each sha256-checked."""
    local = data_dir() / "gpt2_tokenizer" if data_dir() else None
    if local and (local / "vocab.bpe").is_file():
        folder, advice = local, "put OpenAI's files there, or unset LORAFT_DATA_DIR to use the copy inside the package"
    else:
        folder, advice = GPT2_FILES, "reinstall loraft"
    for name, sha256 in GPT2_SHA256.items():
        checked_file(folder / name, sha256, f"GPT-2 BPE file {name}", advice)
    return folder


def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's "gpt2" built from OpenAI's two files."""
    from tiktoken_ext import openai_public

    folder = gpt2_files()
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


# How llama.cpp splits text before BPE, by the GGUF's `tokenizer.ggml.pre`, as `tokenizers` pre-tokenizers
# (each the one in that family's own tokenizer.json). "smollm" isolates every digit, then GPT-2's split;
# Llama 3, Qwen2 (also Qwen2.5 and Qwen3) and GPT-4o (Phi-4-mini) split by their regex, Llama 3 keeping up to
# three digits together.
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# GPT-4o's (tiktoken's o200k_base; Phi-4-mini's): cased words keep their case run together, and "/"
# and line ends stay with the punctuation before them.
O200K_SPLIT = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
# BLOOM's: each run of characters that are not whitespace nor . , ! ? … 。 ， 、 । ۔ ، (nor the ( | ) its
# nested character class also lists), with one space before it; what no run takes is a piece of its own
BLOOM_SPLIT = r" ?[^(\s|[.,!?…。，、।۔،])]+"


def regex_then_bytes(pattern: str):
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


PRE_TOKENIZERS = {
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
    "llama-bpe": lambda: regex_then_bytes(LLAMA3_SPLIT),
    "qwen2": lambda: regex_then_bytes(QWEN2_SPLIT),
    "gpt-4o": lambda: regex_then_bytes(O200K_SPLIT),
    "bloom": lambda: regex_then_bytes(BLOOM_SPLIT),
}
# llama.cpp's token types
NORMAL_TOKEN, UNKNOWN_TOKEN, CONTROL_TOKEN, USER_DEFINED_TOKEN, UNUSED_TOKEN, BYTE_TOKEN = 1, 2, 3, 4, 5, 6

# SentencePiece writes each space as "▁"; its byte fallback spells a character the vocabulary lacks as
# the tokens of its UTF-8 bytes, <0x00> to <0xFF>.
SPACE = "▁"
BYTE_TOKEN_TEXT = re.compile(r"<0x[0-9A-F]{2}>")


def sentencepiece_normalizer(space_prefix: bool):
    """Spaces as ▁ and, with `space_prefix`, a ▁ before each text (and after each special token), as
    llama.cpp and SentencePiece do."""
    replace = normalizers.Replace(" ", SPACE)
    return normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if space_prefix else replace


def sentencepiece_decoder(space_prefix: bool):
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    return decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] * space_prefix)


def merges_by_score(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """A SentencePiece vocabulary's merges as transformers derives them: every split of each normal token
    into two normal tokens, the highest-scoring token's first. BPE merging by these ranks is llama.cpp's
    merging of the adjacent pair whose joined token scores highest."""
    normal = {token for token, kind in zip(tokens, types) if kind == NORMAL_TOKEN}
    merges = []
    for i in sorted(range(len(tokens)), key=lambda i: -scores[i]):
        token = tokens[i]
        if token in normal:
            merges += [(token[:k], token[k:]) for k in range(1, len(token)) if {token[:k], token[k:]} <= normal]
    return merges


class BPETokenizer:
    """A BPE tokenizer held by Hugging Face `tokenizers`, byte-level or SentencePiece's (with byte
    fallback), from a GGUF file's metadata or a model folder's tokenizer.json. It adds no special tokens:
    each task puts `bos_prefix` (the BOS that transformers' tokenizer(text) puts first, if any) before a
    sequence, and its format writes the rest."""

    def __init__(self, tokenizer: HFTokenizer, name: str, eos_id: int, pad_id: int | None, bos_id, chat_template):
        self.tokenizer = tokenizer
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = eos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.bos_id = bos_id
        self.chat_template = chat_template
        self.bos_prefix = ids_before_text(tokenizer)

    @classmethod
    def from_gguf(cls, meta: dict) -> "BPETokenizer":
        kind = meta.get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise LoraftError(
                f"unsupported GGUF tokenizer {kind!r}: loraft reads byte-level BPE ('gpt2') and SentencePiece BPE ('llama')"
            )
        tokens = meta["tokenizer.ggml.tokens"]
        types = meta.get("tokenizer.ggml.token_type") or [NORMAL_TOKEN] * len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        if kind == "gpt2":
            pre = meta.get("tokenizer.ggml.pre", "gpt2")
            if pre not in PRE_TOKENIZERS:
                raise LoraftError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {sorted(PRE_TOKENIZERS)}")
            merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
            # Llama 3 looks a whole piece up in the vocabulary before merging (its tokenizer.json's
            # ignore_merges; llama.cpp does the same for "llama-bpe")
            tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre == "llama-bpe"))
            tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
            tok.decoder = decoders.ByteLevel()
        else:
            unk = meta.get("tokenizer.ggml.unknown_token_id")
            merges = merges_by_score(tokens, meta["tokenizer.ggml.scores"], types)
            unk_token = None if unk is None else tokens[unk]
            tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token=unk_token))
            space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)  # llama.cpp's default
            tok.normalizer = sentencepiece_normalizer(space_prefix)
            tok.decoder = sentencepiece_decoder(space_prefix)
        # llama.cpp finds both kinds whole in the text; only control tokens are special
        tok.add_tokens(
            [
                AddedToken(t, special=k == CONTROL_TOKEN, normalized=False)
                for t, k in zip(tokens, types)
                if k in (CONTROL_TOKEN, USER_DEFINED_TOKEN)
            ]
        )
        bos = meta.get("tokenizer.ggml.bos_token_id")
        if meta.get("tokenizer.ggml.add_bos_token", kind == "llama") and bos is not None:  # llama.cpp's default
            start_with(tok, tokens[bos], bos)
        return cls(
            tok,
            meta.get("general.name", "gguf"),
            meta["tokenizer.ggml.eos_token_id"],
            meta.get("tokenizer.ggml.padding_token_id"),
            meta.get("tokenizer.ggml.bos_token_id"),
            meta.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_folder(cls, folder: Path, model_config: dict) -> "BPETokenizer":
        """tokenizer.json of a Hugging Face model folder; its special tokens and chat template from
        tokenizer_config.json (or chat_template.jinja), else from config.json's token ids."""
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise LoraftError(f"{folder}: no tokenizer.json (loraft reads the `tokenizers` library's file)")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # `tokenizers` raises its own Exception for a broken file
            raise LoraftError(f"{file} is not a readable tokenizer.json ({e})") from None
        settings = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}

        def token_id(key: str):
            token = settings.get(f"{key}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if token is not None:
                if tok.token_to_id(token) is None:
                    raise LoraftError(f"{folder}/tokenizer_config.json: {key}_token {token!r} is not in tokenizer.json")
                return tok.token_to_id(token)
            ids = model_config.get(f"{key}_token_id")
            return ids[0] if isinstance(ids, list) else ids

        eos = token_id("eos")
        if eos is None:
            raise LoraftError(f"{folder}: neither tokenizer_config.json nor config.json names the end-of-text token")
        template = settings.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        return cls(tok, folder.name, eos, token_id("pad"), token_id("bos"), template)

    def encode(self, text: str) -> list[int]:
        check_unicode(text)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(check_texts(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def as_tokenizers(self) -> HFTokenizer:
        """A copy of the `tokenizers` Tokenizer, for a caller to set up and save."""
        return HFTokenizer.from_str(self.tokenizer.to_str())

    def gguf_metadata(self, vocab_size: int) -> dict:
        """The tokenizer.* keys llama.cpp reads, the token list padded to the model's `vocab_size`
        embedding rows as llama.cpp's converter pads it."""
        state = json.loads(self.tokenizer.to_str())
        model = state["model"]
        sentencepiece = model["type"] == "BPE" and model.get("byte_fallback")
        byte_level = model["type"] == "BPE" and (state["decoder"] or {}).get("type") == "ByteLevel"
        if not (sentencepiece or byte_level):
            raise LoraftError(
                f"{self.name}: loraft writes byte-level and SentencePiece BPE tokenizers to GGUF, not this one"
            )
        by_id = {i: t for t, i in self.tokenizer.get_vocab(with_added_tokens=True).items()}
        if max(by_id) >= vocab_size:
            raise LoraftError(f"{self.name}: token id {max(by_id)} does not fit the model's {vocab_size} embeddings")
        added = {t["content"]: t["special"] for t in state["added_tokens"]}

        def token_type(token):
            if sentencepiece and token == model["unk_token"]:
                return UNKNOWN_TOKEN
            if token in added:
                return CONTROL_TOKEN if added[token] else USER_DEFINED_TOKEN
            return BYTE_TOKEN if sentencepiece and BYTE_TOKEN_TEXT.fullmatch(token) else NORMAL_TOKEN

        tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
        types = [token_type(t) if i in by_id else UNUSED_TOKEN for i, t in enumerate(tokens)]
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        metadata = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
        if sentencepiece:
            metadata |= self.sentencepiece_metadata(state, tokens, types, merges)
        else:
            metadata |= {
                "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.pre": pre_tokenizer_name(state["pre_tokenizer"]),
                "tokenizer.ggml.merges": [" ".join(m) for m in merges],
            }
        metadata |= {"tokenizer.ggml.eos_token_id": self.eos_id, "tokenizer.ggml.padding_token_id": self.pad_id}
        if self.bos_id is not None:
            metadata["tokenizer.ggml.bos_token_id"] = self.bos_id
            metadata["tokenizer.ggml.add_bos_token"] = self.bos_prefix == [self.bos_id]
        if self.chat_template:
            metadata["tokenizer.chat_template"] = self.chat_template
        return metadata

    def sentencepiece_metadata(self, state: dict, tokens: list[str], types: list[int], merges: list) -> dict:
        """A "llama" GGUF's scores in place of the merges: llama.cpp joins the adjacent pair whose token
        scores highest, so a token scores minus the rank of the first merge that makes it. Tokens no merge
        makes (characters, bytes, special and padding tokens) score 0: llama.cpp reads a token's score only
        when two adjacent pieces join into it."""
        first = {}
        for rank, (left, right) in enumerate(merges):
            first.setdefault(left + right, rank)
        scores = [-float(first[t]) if t in first else 0.0 for t in tokens]
        # Scores say which token is made first, not which of its splits, so the merges must be every split
        # of each token into two tokens, each token's together, as a SentencePiece vocabulary's are
        ranks = [first[left + right] for left, right in merges]
        if ranks != sorted(ranks) or set(merges) != set(merges_by_score(tokens, scores, types)):
            raise LoraftError(
                f"{self.name}: its merges are not a SentencePiece vocabulary's (every split of every token, "
                f"by score), which is all a 'llama' GGUF can describe"
            )
        metadata = {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.add_space_prefix": sentencepiece_space_prefix(state),
        }
        if state["model"]["unk_token"] is not None:
            metadata["tokenizer.ggml.unknown_token_id"] = self.tokenizer.token_to_id(state["model"]["unk_token"])
        return metadata


def save_for_transformers(tokenizer, folder: Path, max_length: int, tok: HFTokenizer | None = None):
    """tokenizer.json and tokenizer_config.json in `folder`: transformers' AutoTokenizer then encodes
    as `tokenizer` does (the BOS, if any, from tokenizer.json's post-processor), with its special tokens
    and chat template; or as `tok`, the same tokenizer set up to encode otherwise (a classifier's template)."""
    tok = tok or tokenizer.as_tokenizers()
    tok.save(str(folder / "tokenizer.json"))
    by_id = {
        "bos_token": getattr(tokenizer, "bos_id", None),
        "eos_token": tokenizer.eos_id,
        "pad_token": tokenizer.pad_id,
    }
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length}
    settings |= {key: tok.id_to_token(i) for key, i in by_id.items() if i is not None}
    if tokenizer.chat_template:
        settings["chat_template"] = tokenizer.chat_template
    write_json(folder / "tokenizer_config.json", settings)


def without_offsets(value):
    """A serialized tokenizer part without its offsets trimming, which changes no id."""
    if isinstance(value, dict):
        return {k: without_offsets(v) for k, v in value.items() if k != "trim_offsets"}
    return [without_offsets(v) for v in value] if isinstance(value, list) else value


def serialized(normalizer=None, pre_tokenizer=None) -> tuple:
    """(normalizer, pre-tokenizer) as a tokenizer.json has them."""
    probe = HFTokenizer(models.BPE())
    if normalizer is not None:
        probe.normalizer = normalizer
    if pre_tokenizer is not None:
        probe.pre_tokenizer = pre_tokenizer
    state = json.loads(probe.to_str())
    return without_offsets(state["normalizer"]), without_offsets(state["pre_tokenizer"])


def start_with(tok: HFTokenizer, token: str, token_id: int):
    """Make `tok` put `token` before each text it encodes with its special tokens."""
    tok.post_processor = processors.TemplateProcessing(single=f"{token}:0 $A:0", special_tokens=[(token, token_id)])


def ids_before_text(tok: HFTokenizer) -> list[int]:
    """The ids `tok`'s post-processor puts before a text (a BOS, for Llama 3 and Gemma), as in transformers."""
    probe = "Hello world"
    plain, full = tok.encode(probe, add_special_tokens=False).ids, tok.encode(probe).ids
    starts = [i for i in range(len(full) - len(plain) + 1) if plain and full[i : i + len(plain)] == plain]
    if not starts:
        raise LoraftError("the tokenizer's post-processor changes a text's own tokens, which loraft does not follow")
    return full[: starts[0]]


def pre_tokenizer_name(pre_tokenizer: dict) -> str:
    """llama.cpp's name for a tokenizer.json's pre-tokenizer."""
    for name, build in PRE_TOKENIZERS.items():
        if serialized(pre_tokenizer=build())[1] == without_offsets(pre_tokenizer):
            return name
    raise LoraftError(
        f"the tokenizer splits text in a way loraft cannot name for llama.cpp (it knows {', '.join(PRE_TOKENIZERS)})"
    )


def sentencepiece_space_prefix(state: dict) -> bool:
    """llama.cpp's add_space_prefix for a SentencePiece tokenizer.json: False for Gemma's (spaces replaced,
    then a split on the spaces, which none are left), True for Llama 2's (a ▁ prepended by the normalizer,
    or by a Metaspace pre-tokenizer as transformers 5 builds Llama's; Metaspace prepends none to a text
    that starts with a space, llama.cpp does)."""
    metaspace = [pre_tokenizers.Metaspace(SPACE, scheme, split=False) for scheme in ("first", "always")]
    shapes = [
        (serialized(sentencepiece_normalizer(False)), False),
        (serialized(sentencepiece_normalizer(False), pre_tokenizers.Split(" ", "merged_with_previous")), False),
        (serialized(sentencepiece_normalizer(True)), True),
        *[(serialized(None, pre), True) for pre in metaspace],
    ]
    found = (without_offsets(state["normalizer"]), without_offsets(state["pre_tokenizer"]))
    for shape, space_prefix in shapes:
        if shape == found:
            return space_prefix
    raise LoraftError(
        "the SentencePiece tokenizer normalizes or splits text in a way loraft cannot describe to llama.cpp "
        "(it knows Gemma's and Llama 2's)"
    )
