"""`--template chat` renders the model's own chat template as transformers' apply_chat_template does:
templates laid out as Llama 3's, Gemma 3's and Phi-4's (written here: no real one can be had offline)
over tokenizers with their special tokens, compared with transformers on the same folder."""

import json

import pytest
import transformers
from tokenizers import AddedToken, processors

from loraft.data.instruction import Example, encode_examples, end_id, format_prompt, render_chat
from loraft.errors import LoraftError
from loraft.tokenizer import BPETokenizer

from ..models.checkpoints import write_tokenizer

LLAMA3_LIKE = (
    "{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\nToday Date: {{ date_string }}<|eot_id|>"
    "{%- for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
GEMMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
PHI4_LIKE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% else %}{{ eos_token }}{% endif %}"
)
CASES = {
    "llama3": (
        LLAMA3_LIKE,
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
    ),
    "gemma3": (GEMMA3_LIKE, ["<bos>", "<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
    "phi4": (PHI4_LIKE, ["<|user|>", "<|assistant|>", "<|end|>"], "<|end|>"),
}


def chat_folder(folder, texts, template, specials):
    tokenizer = write_tokenizer(folder, texts[:500])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos = specials[0] if "bos_token" in template else None
    if bos:  # a text starts with BOS, as Llama 3's and Gemma's do: the template's own must not be doubled
        single = f"{bos} $A"
        tokenizer.post_processor = processors.TemplateProcessing(
            single, special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    tokenizer.save(str(folder / "tokenizer.json"))
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings |= {"chat_template": template, "bos_token": bos}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return BPETokenizer.from_folder(folder, {}), transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("kind", CASES)
def test_chat_prompts_and_examples_equal_transformers_apply_chat_template(tmp_path, sms_texts, kind):
    template, specials, end = CASES[kind]
    ours, theirs = chat_folder(tmp_path, sms_texts, template, specials)
    example = Example("Rewrite the sentence.", "The cake was eaten by me.", "I ate the cake.")
    question = {"role": "user", "content": "Rewrite the sentence.\n\nThe cake was eaten by me."}
    prompt = theirs.apply_chat_template([question], tokenize=False, add_generation_prompt=True)
    assert format_prompt(ours, example.instruction, example.input, "chat") == prompt

    (sequence,), (prompt_length,) = encode_examples(ours, [example], "chat", 256)
    answer = {"role": "assistant", "content": example.output}
    whole = theirs.apply_chat_template([question, answer], tokenize=True, return_dict=False)
    assert end_id(ours, "chat") == theirs.convert_tokens_to_ids(end)
    assert sequence == whole[: whole.index(end_id(ours, "chat"), prompt_length) + 1]
    assert sequence[:prompt_length] == theirs(prompt, add_special_tokens=False).input_ids
    (alpaca,), (alpaca_length,) = encode_examples(ours, [example], "alpaca", 256)
    alpaca_prompt = format_prompt(ours, example.instruction, example.input, "alpaca")
    assert alpaca[:alpaca_length] == theirs(alpaca_prompt).input_ids  # with the tokenizer's own BOS, if any


def test_a_template_that_refuses_or_cannot_end_an_answer_is_one_clear_error(tmp_path, sms_texts):
    ours, _ = chat_folder(tmp_path, sms_texts, GEMMA3_LIKE, CASES["gemma3"][1])
    with pytest.raises(LoraftError, match="refuses the conversation: Conversation roles must alternate"):
        render_chat(ours, [{"role": "assistant", "content": "hi"}], add_generation_prompt=True)
    ours.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(LoraftError, match="writes no end-of-turn token after an answer; use --template alpaca"):
        end_id(ours, "chat")
    ours.chat_template = "{% for m in messages %}"
    with pytest.raises(LoraftError, match="is not valid jinja2"):
        format_prompt(ours, "x", "", "chat")


def test_transformers_template_helpers_render_alike(tmp_path, sms_texts):
    """{% generation %} (transformers' assistant-token marks), tojson's arguments, pad_token; a template's
    own Python error is one clear line."""
    ours, theirs = chat_folder(tmp_path, sms_texts, PHI4_LIKE, CASES["phi4"][1])
    ours.chat_template = (
        "{{ messages | tojson(indent=2, sort_keys=True) }}{% for m in messages %}{% generation %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endgeneration %}{% endfor %}{{ pad_token }}"
    )
    question = [{"role": "user", "content": "Ünïcode?"}]
    theirs.chat_template = ours.chat_template
    assert render_chat(ours, question, False) == theirs.apply_chat_template(question, tokenize=False)
    ours.chat_template = "{{ messages | tojson(nonsense=1) }}"
    with pytest.raises(LoraftError, match="failed to render .TypeError"):
        render_chat(ours, question, False)
