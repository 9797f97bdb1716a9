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
from bitserve.tokenizer import Tokenizer
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


def test_llm_empty_prompt(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=1))
