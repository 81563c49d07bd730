"""Random-weight checkpoints that transformers writes from each family's real config, for the tests
that compare loraft with transformers (and with itself through GGUF)."""

import json

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers.tokenization_utils_base import generate_merges

from loraft.tokenizer import PRE_TOKENIZERS

PROMPT = [5, 17, 42, 250, 3, 99, 7]

# The config.json of each family's real checkpoint on the hub (only what differs from the defaults of
# transformers' config class), for the models of `loraft models`.
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=32.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
# Gemma 3's repeating layer pattern: five sliding-window layers, then one over the whole context.
GEMMA3_LAYERS = ["sliding_attention"] * 5 + ["full_attention"]
GEMMA3_ROPE = dict(
    full_attention=dict(rope_type="default", rope_theta=1000000.0),
    sliding_attention=dict(rope_type="default", rope_theta=10000.0),
)
REAL = {
    "llama-3.2-1b": (
        "Llama",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            rope_parameters=LLAMA3_ROPE,
        ),
    ),
    "smollm2-360m": (
        "Llama",
        dict(
            hidden_size=960,
            intermediate_size=2560,
            num_attention_heads=15,
            num_key_value_heads=5,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            rope_parameters=dict(rope_type="default", rope_theta=100000.0),
        ),
    ),
    "mistral-7b-v0.1": (
        "Mistral",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=32768,
            sliding_window=4096,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
    ),
    "qwen2.5-0.5b": (
        "Qwen2",
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            use_sliding_window=False,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
    ),
    "qwen3-0.6b": (
        "Qwen3",
        dict(
            hidden_size=1024,
            intermediate_size=3072,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
    ),
    "phi-4-mini": (
        "Phi3",
        dict(
            hidden_size=3072,
            intermediate_size=8192,
            num_attention_heads=24,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            original_max_position_embeddings=4096,
            partial_rotary_factor=0.75,
            sliding_window=262144,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            rope_parameters=dict(
                rope_type="longrope",
                rope_theta=10000.0,
                short_factor=[1.0 + 0.05 * i for i in range(48)],  # 48 = 128 * 0.75 / 2 rotated pairs
                long_factor=[1.0 + 0.5 * i for i in range(48)],
            ),
        ),
    ),
    "gemma-3-270m": (
        "Gemma3Text",
        dict(
            hidden_size=640,
            intermediate_size=2048,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=512,
            layer_types=GEMMA3_LAYERS,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            rope_parameters=GEMMA3_ROPE,
        ),
    ),
    "gemma-3-1b": (
        "Gemma3Text",
        dict(
            hidden_size=1152,
            intermediate_size=6912,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=512,
            layer_types=GEMMA3_LAYERS,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            rope_parameters=GEMMA3_ROPE,
        ),
    ),
    "bloom-560m": ("Bloom", dict(hidden_size=1024, num_attention_heads=16, layer_norm_epsilon=1e-5)),
}
# The same switches at tiny widths: 4 query heads and 2 key/value heads of 16 dimensions.
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
TINY_CHANGES = {
    "qwen3-0.6b": dict(head_dim=32),  # wider than hidden_size / heads, as Qwen3's
    "phi-4-mini": dict(
        head_dim=None,
        max_position_embeddings=256,
        original_max_position_embeddings=64,
        rope_parameters=dict(
            rope_type="longrope",
            rope_theta=10000.0,
            short_factor=[1.0, 1.3, 1.7, 2.2, 3.0, 4.1],
            long_factor=[2.0, 3.0, 5.0, 8.0, 13.0, 21.0],
        ),
    ),
    "mistral-7b-v0.1": dict(sliding_window=64),
    # a window shorter than the prompts, and a query scale that is not head_dim's
    "gemma-3-270m": dict(sliding_window=4, query_pre_attn_scalar=24),
    "gemma-3-1b": dict(sliding_window=3, query_pre_attn_scalar=8),
    # ALiBi's slopes for a head count that is not a power of two (BLOOM-176B has 112 heads); BLOOM's
    # feed-forward is four times its width, its heads hidden_size / n_head wide
    "bloom-560m": dict(
        hidden_size=48, num_attention_heads=6, intermediate_size=None, num_key_value_heads=None, head_dim=None
    ),
}


def hf_checkpoint(folder, name, tiny=True, vocab_size=300, layers=2, shard_size=None, **changes):
    """A random-weight transformers model of `name`'s family, saved as a checkpoint folder."""
    kind, real = REAL[name]
    options = {**real, "vocab_size": vocab_size, "num_hidden_layers": layers, "eos_token_id": None, "pad_token_id": 0}
    if tiny:
        options |= TINY | TINY_CHANGES.get(name, {})
    options = {key: value for key, value in {**options, **changes}.items() if value is not None}
    if "layer_types" in options:  # the pattern's last layers: sliding ones, then one over everything
        options["layer_types"] = (options["layer_types"] * layers)[-layers:]
    torch.manual_seed(0)
    config = getattr(transformers, f"{kind}Config")(**options)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()  # Gemma3TextConfig: Gemma3ForCausalLM
    with torch.no_grad():  # weights large enough that a wrong layout changes the logits and the tokens
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 2 / param.shape[-1] ** 0.5)
            else:
                param.normal_(1 if param.shape[0] == config.hidden_size else 0, 0.5)
    model.save_pretrained(folder, **({"max_shard_size": shard_size} if shard_size else {}))
    return model


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tokenizer(folder, texts, pre="gpt2", vocab_size=300):
    """A byte-level BPE trained on `texts` with llama.cpp's pre-tokenizer `pre`, saved as a model
    folder's tokenizer.json and tokenizer_config.json (special tokens and chat template, as SmolLM2's)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.model.ignore_merges = pre == "llama-bpe"  # as Llama 3's tokenizer.json
    tokenizer.save(str(folder / "tokenizer.json"))
    settings = dict(
        tokenizer_class="PreTrainedTokenizerFast",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return tokenizer


# tokenizer_config.json's class, the special tokens (ids from 0: unk, bos, eos, pad where it has one) and
# whether a ▁ goes before each text, as in Gemma 3's and Llama 2's (also Phi-3's) files
SENTENCEPIECE_STYLES = {
    "gemma": ("GemmaTokenizer", dict(pad="<pad>", eos="<eos>", bos="<bos>", unk="<unk>"), False),
    "llama": ("LlamaTokenizer", dict(unk="<unk>", bos="<s>", eos="</s>"), True),
}
GEMMA_CHAT_TEMPLATE = (
    "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def write_sentencepiece_tokenizer(folder, texts, style="gemma", vocab_size=500):
    """A SentencePiece BPE with byte fallback in `style`'s tokenizer.json shape, saved with its
    tokenizer_config.json. No real one can be had offline, so `tokenizers` trains one on `texts` (split at
    spaces, as SentencePiece trains), and it is given the merges SentencePiece-derived files have:
    transformers' every split of every token into two tokens, by the token's score (minus its id: the
    trainer numbers tokens in the order it made them). Byte tokens <0x00>..<0xFF> follow the specials."""
    tokenizer_class, specials, space_prefix = SENTENCEPIECE_STYLES[style]
    special_tokens = list(specials.values()) + (["<start_of_turn>", "<end_of_turn>"] if style == "gemma" else [])
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace("▁", "always" if space_prefix else "never", split=True)
    trained.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    pieces = sorted(trained.get_vocab(), key=trained.token_to_id)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    vocab = {token: i for i, token in enumerate(special_tokens + byte_tokens + pieces)}
    scores = {token: -float(i) for token, i in vocab.items()}
    merges = generate_merges(vocab, scores, skip_tokens=set(special_tokens) | set(byte_tokens))

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    decoder = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:  # as transformers 5 writes Llama's: a Metaspace pre-tokenizer puts the ▁ first
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace("▁", "first", split=False)
        decoder.append(decoders.Strip(" ", 1, 0))
    else:  # as the hub's Gemma 3 file: spaces replaced, then a split at spaces (none are left)
        tokenizer.normalizer = normalizers.Replace(" ", "▁")
        tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tokenizer.decoder = decoders.Sequence(decoder)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special_tokens])
    bos = specials["bos"]  # each text starts with BOS, as both put it
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tokenizer.save(str(folder / "tokenizer.json"))
    settings = {f"{key}_token": token for key, token in specials.items()}
    settings |= dict(tokenizer_class=tokenizer_class, add_bos_token=True, add_eos_token=False)
    if style == "gemma":
        settings["chat_template"] = GEMMA_CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return tokenizer
