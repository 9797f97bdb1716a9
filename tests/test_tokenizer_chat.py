"""Tokenizer + chat template parity with transformers (the independent oracle)."""

import json

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from bitserve.tokenizer import ChatTemplateError, Tokenizer

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Meta's Llama-3 instruct template (verbatim structure)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# multi-line layout: only renders like transformers with trim_blocks + lstrip_blocks;
# also exercises a default system prompt, tojson (non-ASCII kept) and raise_exception.
MULTILINE = """{{ bos_token }}
{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] %}
    {% set rest = messages[1:] %}
{% else %}
    {% set system = 'You are a helpful assistant.' %}
    {% set rest = messages %}
{% endif %}
<|start_header_id|>system<|end_header_id|>

{{ system }}<|eot_id|>
{% for message in rest %}
    {% if message['role'] == 'system' %}
        {{ raise_exception('System message must come first') }}
    {% endif %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>

{{ message['content'] }} {{ message['content'] | tojson }}<|eot_id|>
{% endfor %}
{% if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "The system says hi."}, {"role": "user", "content": "  how are you?  "}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "I am a helpful assistant. héllo ☃"},
        {"role": "user", "content": "The end"},
    ],
]


def _build_tokenizer_json(path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Hello there, how are you? I am a helpful assistant. The system says hi."] * 3, trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(path))


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    _build_tokenizer_json(path)
    return path


def _folder(tmp_path, tokenizer_json, template, name="t"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _ids(result):
    return list(result["input_ids"]) if hasattr(result, "keys") else list(result)


@pytest.mark.parametrize("template", [LLAMA3, MULTILINE], ids=["llama3", "multiline"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_parity(tmp_path, tokenizer_json, template, conv, add_generation_prompt):
    folder = _folder(tmp_path, tokenizer_json, template)
    ours = Tokenizer(folder)
    theirs = AutoTokenizer.from_pretrained(str(folder))
    messages = CONVERSATIONS[conv]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == expected
    assert text.startswith("<|begin_of_text|>") and text.count("<|begin_of_text|>") == 1
    assert text.endswith("<|end_header_id|>\n\n") == add_generation_prompt
    ids = ours.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ids == _ids(theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt))
    assert ids.count(ours.token_to_id("<|begin_of_text|>")) == 1  # the template's bos, not a second one


def test_parity_with_pretrained_tokenizer_fast(tmp_path, tokenizer_json):
    folder = _folder(tmp_path, tokenizer_json, LLAMA3)
    ours = Tokenizer(folder)
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), bos_token="<|begin_of_text|>",
                                     eos_token="<|eot_id|>")
    theirs.chat_template = LLAMA3
    for conv in CONVERSATIONS:
        assert ours.apply_chat_template(conv) == theirs.apply_chat_template(conv, tokenize=False,
                                                                           add_generation_prompt=True)
    text = "Hello there, how are you?"
    assert ours.encode(text) == theirs(text)["input_ids"]
    assert ours.encode(text)[0] == ours.token_to_id("<|begin_of_text|>")
    assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.eos_token_ids == (theirs.convert_tokens_to_ids("<|eot_id|>"),)


def test_jinja_file_parity(tmp_path, tokenizer_json):
    folder = _folder(tmp_path, tokenizer_json, None)
    (folder / "chat_template.jinja").write_text(MULTILINE)
    ours = Tokenizer(folder)
    theirs = AutoTokenizer.from_pretrained(str(folder))
    conv = CONVERSATIONS[2]
    assert ours.apply_chat_template(conv) == theirs.apply_chat_template(conv, tokenize=False,
                                                                        add_generation_prompt=True)


def test_decode_skips_special_tokens(tmp_path, tokenizer_json):
    folder = _folder(tmp_path, tokenizer_json, LLAMA3)
    ours = Tokenizer(folder)
    theirs = AutoTokenizer.from_pretrained(str(folder))
    conv = CONVERSATIONS[2]
    ids = ours.encode_chat(conv)
    text = ours.apply_chat_template(conv)
    assert ours.decode(ids, skip_special_tokens=False) == text
    plain = ours.decode(ids, skip_special_tokens=True)
    assert plain == theirs.decode(ids, skip_special_tokens=True)
    assert not any(s in plain for s in SPECIALS)
    assert "Hello" in plain and "héllo ☃" in plain and "system" in plain
    assert ours.decode(ids) == plain  # skipping is the default


def test_raise_exception_is_chat_template_error(tmp_path, tokenizer_json):
    folder = _folder(tmp_path, tokenizer_json, MULTILINE)
    ours = Tokenizer(folder)
    bad = [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]
    with pytest.raises(ChatTemplateError, match="System message must come first"):
        ours.apply_chat_template(bad)
    with pytest.raises(ChatTemplateError, match="System message must come first"):
        ours.encode_chat(bad)
    # transformers refuses the same conversation
    with pytest.raises(Exception, match="System message must come first"):
        AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(bad, tokenize=False)


def test_template_syntax_error(tmp_path, tokenizer_json):
    ours = Tokenizer(_folder(tmp_path, tokenizer_json, "{% for m in messages %}{{ m['content'] }"))
    with pytest.raises(ChatTemplateError):
        ours.apply_chat_template(CONVERSATIONS[0])


def test_template_type_error_is_chat_template_error(tmp_path, tokenizer_json):
    """A template whose operations fail on a message's values (here: text + number) refuses the
    conversation like any template error (INVALID_ARGUMENT over gRPC), not as a server fault."""
    ours = Tokenizer(_folder(tmp_path, tokenizer_json, "{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}"))
    with pytest.raises(ChatTemplateError, match="chat template failed"):
        ours.apply_chat_template(CONVERSATIONS[0])


def test_bad_messages(tmp_path, tokenizer_json):
    ours = Tokenizer(_folder(tmp_path, tokenizer_json, LLAMA3))
    with pytest.raises(ChatTemplateError, match="robot"):
        ours.apply_chat_template([{"role": "robot", "content": "beep"}])
    with pytest.raises(ChatTemplateError, match="empty"):
        ours.apply_chat_template([])
    with pytest.raises(ChatTemplateError, match=r"messages\[1\]"):
        ours.apply_chat_template([{"role": "user", "content": "x"}, {"content": "no role"}])


def test_no_template(tmp_path, tokenizer_json):
    ours = Tokenizer(_folder(tmp_path, tokenizer_json, None))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ours.apply_chat_template(CONVERSATIONS[0])


def test_named_templates_pick_default(tmp_path, tokenizer_json):
    named = [{"name": "tool_use", "template": "TOOLS {{ messages | length }}"},
             {"name": "default", "template": LLAMA3},
             {"name": "rag", "template": "RAG"}]
    ours = Tokenizer(_folder(tmp_path, tokenizer_json, named))
    reference = Tokenizer(_folder(tmp_path, tokenizer_json, LLAMA3, name="plain"))
    for conv in CONVERSATIONS:
        assert ours.apply_chat_template(conv) == reference.apply_chat_template(conv)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    assert ours.apply_chat_template(CONVERSATIONS[1]) == theirs.apply_chat_template(
        CONVERSATIONS[1], tokenize=False, add_generation_prompt=True)


def test_generation_block_renders_like_transformers(tmp_path, tokenizer_json):
    """HF templates mark the assistant's text with {% generation %}...{% endgeneration %}."""
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
                "{% endgeneration %}{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}")
    folder = _folder(tmp_path, tokenizer_json, template)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ours = Tokenizer(folder).apply_chat_template(messages, add_generation_prompt=False)
    theirs = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(messages, tokenize=False)
    assert ours == theirs == "user: hi\nyo"
