"""Bad checkpoints and bad requests fail loudly, naming the file / tensor / field."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitserve.llm import LLM
from bitserve.loader import load_model
from bitserve.plugins.checkpoint import CheckpointError
from bitserve.plugins.registry import UnknownFormatError
from bitserve.sampling_params import SamplingParams
from bitserve.tokenizer import ChatTemplateError, Tokenizer
from tiny_checkpoints import bitnet_config, random_bitnet_state, write_bitnet_checkpoint

Q = "model.layers.1.self_attn.q_proj"
K = "model.layers.1.self_attn.k_proj"
NORM = "model.layers.0.post_attention_layernorm.weight"


def write_wordlevel_tokenizer(folder, vocab_size=96):
    """A WordLevel tokenizer (whitespace-split words w0..wN plus specials) as tokenizer.json."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, vocab_size):
        vocab[f"w{i}"] = i
    tok = HFTokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    config = bitnet_config(num_hidden_layers=2)
    folder = write_bitnet_checkpoint(tmp_path_factory.mktemp("good") / "ckpt", config, random_bitnet_state(config, 5))
    write_wordlevel_tokenizer(folder)
    load_model(folder, device="cpu", dtype="float32")  # the unmodified checkpoint loads
    return folder


@pytest.fixture
def ckpt(tmp_path, good):
    """A fresh copy of the good checkpoint to break."""
    folder = tmp_path / "broken"
    shutil.copytree(good, folder)
    return folder


def _edit_tensors(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def _edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def _load_fails(folder, exc=CheckpointError, *substrings):
    with pytest.raises(exc) as err:
        load_model(folder, device="cpu", dtype="float32")
    msg = str(err.value)
    for s in substrings:
        assert s in msg, f"{s!r} not in error message: {msg}"
    return msg


# -- missing tensors ---------------------------------------------------------------------
def test_missing_weight_scale(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop(f"{K}.weight_scale"))
    _load_fails(ckpt, CheckpointError, f"{K}.weight_scale", "missing", str(ckpt))


def test_missing_norm(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop(NORM))
    _load_fails(ckpt, CheckpointError, NORM, "missing")


# -- wrong shape / dtype / content -----------------------------------------------------------
def test_packed_weight_wrong_rows(ckpt):
    def edit(t):
        w = t[f"{Q}.weight"]
        t[f"{Q}.weight"] = torch.cat([w, w[:1]])  # (N/4 + 1, K)

    path = _edit_tensors(ckpt, edit)
    _load_fails(ckpt, CheckpointError, f"{Q}.weight", "shape", "[17, 64]", "[16, 64]", str(path))


@pytest.mark.parametrize("dtype,name", [(torch.int32, "I32"), (torch.float32, "F32"), (torch.bfloat16, "BF16")])
def test_packed_weight_wrong_dtype(ckpt, dtype, name):
    path = _edit_tensors(ckpt, lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"].to(dtype)}))
    _load_fails(ckpt, CheckpointError, f"{Q}.weight", name, "U8", str(path))


def test_invalid_code_3(ckpt):
    def edit(t):
        w = t[f"{K}.weight"].clone()
        w[3, 5] = (w[3, 5] & 0b11110011) | 0b00001100  # code 3 in bits 2..3
        t[f"{K}.weight"] = w

    path = _edit_tensors(ckpt, edit)
    _load_fails(ckpt, CheckpointError, f"{K}.weight", "code 3", str(path))


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_bad_weight_scale_value(ckpt, value):
    _edit_tensors(ckpt, lambda t: t.update({f"{Q}.weight_scale": torch.tensor([value])}))
    _load_fails(ckpt, CheckpointError, f"{Q}.weight_scale")


def test_nan_in_norm(ckpt):
    def edit(t):
        w = t[NORM].clone()
        w[7] = float("nan")
        t[NORM] = w

    path = _edit_tensors(ckpt, edit)
    _load_fails(ckpt, CheckpointError, NORM, "NaN", str(path))


def test_nan_in_dense_linear(tmp_path):
    from tiny_checkpoints import write_llama_checkpoint

    folder = write_llama_checkpoint(tmp_path / "dense")
    load_model(folder, device="cpu", dtype="float32")
    name = "model.layers.1.mlp.down_proj.weight"

    def edit(t):
        w = t[name].clone()
        w[3, 4] = float("inf")
        t[name] = w

    path = _edit_tensors(folder, edit)
    _load_fails(folder, CheckpointError, name, "NaN or Inf", str(path))


# -- config problems ----------------------------------------------------------------------------
def test_unknown_quant_method(ckpt):
    _edit_config(ckpt, lambda c: c.update(quantization_config={"quant_method": "bitnet9000"}))
    _load_fails(ckpt, UnknownFormatError, "bitnet9000", "installed formats", "dense", "bitnet")


def test_unknown_linear_class(ckpt):
    _edit_config(ckpt, lambda c: c["quantization_config"].update(linear_class="superbitlinear"))
    _load_fails(ckpt, CheckpointError, "config.json", "linear_class", "superbitlinear")


def test_unknown_quantization_mode(ckpt):
    _edit_config(ckpt, lambda c: c["quantization_config"].update(quantization_mode="sideways"))
    _load_fails(ckpt, CheckpointError, "config.json", "quantization_mode", "sideways")


def test_unsupported_model_type(ckpt):
    _edit_config(ckpt, lambda c: c.update(model_type="gpt2"))
    _load_fails(ckpt, CheckpointError, "model_type", "gpt2")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    _load_fails(ckpt, CheckpointError, str(ckpt / "config.json"), "missing")


def test_malformed_config(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "bitnet", "hidden_size": ')
    _load_fails(ckpt, CheckpointError, str(ckpt / "config.json"), "malformed")


def test_missing_config_field(ckpt):
    _edit_config(ckpt, lambda c: c.pop("num_attention_heads"))
    _load_fails(ckpt, CheckpointError, "num_attention_heads")


@pytest.mark.parametrize("field,value,words", [
    ("hidden_size", None, ["hidden_size", "null"]),
    ("hidden_size", "64", ["hidden_size", "integer"]),
    ("hidden_size", 64.5, ["hidden_size", "integer"]),
    ("num_attention_heads", 0, ["num_attention_heads", ">= 1"]),
    ("num_hidden_layers", -1, ["num_hidden_layers", ">= 1"]),
    ("vocab_size", True, ["vocab_size", "integer"]),
    ("rms_norm_eps", 0, ["rms_norm_eps", "positive"]),
    ("rope_theta", float("nan"), ["rope_theta", "positive"]),
    ("rope_scaling", "linear", ["rope_scaling", "object"]),
    ("rope_scaling", {"rope_type": "linear"}, ["rope_scaling", "'factor' is missing"]),
    ("rope_scaling", {"rope_type": "linear", "factor": 0}, ["rope_scaling", "factor must be positive"]),
    ("rope_scaling", {"rope_type": "linear", "factor": -2.0}, ["rope_scaling", "factor must be positive"]),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}, ["rope_scaling", "'low_freq_factor' is missing"]),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192}, ["high_freq_factor (1.0) must be larger"]),
    ("tie_word_embeddings", "false", ["tie_word_embeddings", "true or false"]),
    ("hidden_size", 63, ["hidden_size 63 is not a multiple of num_attention_heads"]),
    ("eos_token_id", "x", ["eos_token_id", "token id"]),
    ("quantization_config", "bitnet", ["quantization_config", "object"]),
])
def test_config_field_of_wrong_type(ckpt, field, value, words):
    _edit_config(ckpt, lambda c: c.update({field: value}))
    _load_fails(ckpt, CheckpointError, "config.json", *words)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json"])
@pytest.mark.parametrize("text", ["[1, 2]", "null", "\udcff"])
def test_json_file_that_is_not_an_object(ckpt, name, text):
    path = ckpt / name
    if text == "\udcff":
        path.write_bytes(b'{"a": "\xff"}')  # not UTF-8
    else:
        path.write_text(text)
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt, device="cpu", dtype="float32")
        Tokenizer(ckpt)
    assert str(path) in str(err.value)


def test_bad_chat_templates(ckpt):
    (ckpt / "chat_template.jinja").write_bytes(b"\xff{{ messages }}")
    with pytest.raises(CheckpointError, match="chat_template.jinja.*UTF-8"):
        Tokenizer(ckpt)
    (ckpt / "chat_template.jinja").unlink()
    for template, words in [(5, "must be a string"), ([{"name": "default"}, "x"], "named templates")]:
        cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
        (ckpt / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
        with pytest.raises(CheckpointError, match=words):
            Tokenizer(ckpt)


def test_more_layers_than_the_config_declares(ckpt):
    _edit_config(ckpt, lambda c: c.update(num_hidden_layers=1))  # the file holds layers 0 and 1
    _load_fails(ckpt, CheckpointError, "layer 1", "model.layers.1", "declares 1 layer")


def test_unused_tensors_are_reported(ckpt, caplog):
    _edit_tensors(ckpt, lambda t: t.update({"model.layers.0.mystery.weight": torch.ones(3),
                                            "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    with caplog.at_level("WARNING", logger="bitserve.loader"):
        load_model(ckpt, device="cpu", dtype="float32")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "1 tensor(s)" in warnings[0] and "model.layers.0.mystery.weight" in warnings[0]


# -- broken files ---------------------------------------------------------------------------------
def test_truncated_safetensors(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _load_fails(ckpt, CheckpointError, str(path), "truncated")


@pytest.mark.parametrize("size", [0, 5])
def test_tiny_safetensors(ckpt, size):
    path = ckpt / "model.safetensors"
    path.write_bytes(b"\x10" * size)
    _load_fails(ckpt, CheckpointError, str(path), "truncated")


def test_garbage_header(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 64)
    _load_fails(ckpt, CheckpointError, str(path), "header")


def test_missing_shard(tmp_path):
    config = bitnet_config(num_hidden_layers=1)
    folder = write_bitnet_checkpoint(tmp_path / "sharded", config, random_bitnet_state(config, 9), shards=2)
    load_model(folder, device="cpu", dtype="float32")  # loads when complete
    shard = folder / "model-00002-of-00002.safetensors"
    shard.unlink()
    _load_fails(folder, CheckpointError, "model.safetensors.index.json", "model-00002-of-00002.safetensors", "missing")


@pytest.mark.parametrize("header,words", [
    ([1, 2], "not a JSON object"),
    ({"a": {"dtype": "F32", "shape": [1]}}, "'a'"),
    ({"a": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}, "'a'"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, "'a'"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "overlap"),
])
def test_corrupt_safetensors_header(ckpt, header, words):
    path = ckpt / "model.safetensors"
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 16)
    _load_fails(ckpt, CheckpointError, str(path), words)


def test_unknown_safetensors_dtype(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header[f"{Q}.weight"]["dtype"] = "Q4"
    raw = json.dumps(header).encode().ljust(n)
    path.write_bytes(data[:8] + raw + data[8 + n:])
    _load_fails(ckpt, CheckpointError, str(path))


def test_malformed_index(tmp_path):
    config = bitnet_config(num_hidden_layers=1)
    folder = write_bitnet_checkpoint(tmp_path / "sharded", config, random_bitnet_state(config, 9), shards=2)
    index = folder / "model.safetensors.index.json"
    for text in ('{"weight_map": ["a"]}', "[]"):
        index.write_text(text)
        _load_fails(folder, CheckpointError, str(index))


def test_no_weight_files(ckpt):
    (ckpt / "model.safetensors").unlink()
    _load_fails(ckpt, CheckpointError, str(ckpt), "safetensors")


def test_missing_tokenizer(ckpt):
    Tokenizer(ckpt)  # present: fine
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError) as err:
        Tokenizer(ckpt)
    assert str(ckpt / "tokenizer.json") in str(err.value)
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        LLM(str(ckpt), device="cpu", dtype="float32")


# -- request validation ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(top_k=-2), "top_k"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_valid_edges():
    SamplingParams(temperature=0, top_p=1.0, max_tokens=1, top_k=-1)
    assert SamplingParams(stop="x").stop == ["x"]


@pytest.fixture(scope="module")
def llm(good):
    return LLM(str(good), device="cpu", dtype="float32", max_model_len=16)


def test_llm_prompt_too_long(llm):
    assert llm.max_model_len == 16
    out = llm.generate([list(range(3, 18))], SamplingParams(temperature=0, max_tokens=1))  # 15 + 1 tokens: fits
    assert len(out[0].outputs[0].token_ids) == 1
    with pytest.raises(ValueError, match="16 tokens"):  # no room left to generate
        llm.generate([list(range(3, 19))], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="tokens"):
        llm.generate(" ".join(f"w{i}" for i in range(3, 40)), SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="exceed"):
        llm.logits(list(range(3, 20)))


@pytest.mark.parametrize("ids", [[5, 96], [5, -1], [1000]])
def test_llm_token_ids_out_of_range(llm, ids):
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([ids], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="out of range"):  # (was an IndexError from the embedding)
        llm.logits(ids)


def test_llm_chat_wants_a_list_of_messages(llm):
    with pytest.raises(TypeError, match="list of"):
        llm.chat({"role": "user", "content": "hi"})


def test_shards_outside_the_checkpoint_folder_are_refused(tmp_path):
    config = bitnet_config(num_hidden_layers=1)
    folder = write_bitnet_checkpoint(tmp_path / "sharded", config, random_bitnet_state(config, 9), shards=2)
    index = folder / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    outside = tmp_path / "elsewhere.safetensors"
    (folder / "model-00002-of-00002.safetensors").rename(outside)
    doc["weight_map"] = {k: ("../elsewhere.safetensors" if v.endswith("00002.safetensors") else v)
                         for k, v in doc["weight_map"].items()}
    index.write_text(json.dumps(doc))
    _load_fails(folder, CheckpointError, str(index), "outside the checkpoint folder", "elsewhere.safetensors")


@pytest.mark.parametrize("template", ["{{ 1 / 0 }}", "{% for i in range(10**9) %}{% endfor %}",
                                      "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"])
def test_chat_templates_that_fail_in_their_own_code(ckpt, template):
    """A template's own runtime error (division by zero, a range too large, endless recursion) is
    a ChatTemplateError naming it (INVALID_ARGUMENT over gRPC), not an internal error."""
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    with pytest.raises(ChatTemplateError, match="chat template failed"):
        Tokenizer(ckpt).apply_chat_template([{"role": "user", "content": "hi"}])


def test_special_token_that_is_not_text(ckpt):
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": 5}))
    with pytest.raises(CheckpointError, match="eos_token must be the token's text, not 5"):
        Tokenizer(ckpt)


def test_llm_empty_prompt(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=1))


def test_latent_weight_bitnet_reproductions_are_refused(tmp_path):
    """1bitLLM's BitnetForCausalLM checkpoints (float latent weights, weight_bits 1, sub-norms
    inner_attn_ln / ffn_layernorm) would load as a dense Llama and compute something else."""
    from bitserve.converters import convert_checkpoint
    from tiny_checkpoints import write_llama_checkpoint

    folder = write_llama_checkpoint(tmp_path / "1bitllm")
    _edit_config(folder, lambda c: c.update(architectures=["BitnetForCausalLM"], weight_bits=1, input_bits=8))
    _load_fails(folder, CheckpointError, "1bitLLM", "BitnetForCausalLM", "quant_method 'bitnet'")
    with pytest.raises(CheckpointError, match="1bitLLM"):
        convert_checkpoint(folder, tmp_path / "out", "bitnet", progress=False)
    load_model(folder, format="dense", device="cpu", dtype="float32")  # forcing a format is the user's call
