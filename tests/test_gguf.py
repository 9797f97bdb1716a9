"""The ``gguf`` format: block codecs vs ``gguf.quants``, synthetic llama.cpp-layout files vs a float64
reference built from ``gguf.quants``-dequantized tensors, dense llama vs transformers, lossless
bitnet <-> GGUF round trips, tokenizer metadata, and clear errors for damaged files.

The synthetic files are written here with ``gguf.GGUFWriter`` following llama.cpp's conventions
(tensor names, ``<arch>.*`` keys, the q/k row permutation of the llama converter restated below);
nothing in this file uses bitserve's own GGUF encoders to build what it then checks.
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, quants

from bitserve.loader import load_model
from bitserve.model.prefill import prefill_logits
from bitserve.plugins.checkpoint import CheckpointError

DEMO = Path(__file__).resolve().parents[1] / "server" / "demo" / "model"
SPACE = "\u2581"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# -- independent restatements of the on-disk rules -------------------------------------------------

def llamacpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation: within each head, row j*d/2+i -> row 2i+j."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llamacpp_unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def i2_s_bytes(t: np.ndarray, scale: float) -> np.ndarray:
    """FORMATS.md §2.4: 128-element blocks of the row-major tensor, element j of block b in byte
    32b + j%32 at shift 6 - 2*(j//32), code t+1; float32 scale at byte N*K/4, 32-byte tail."""
    codes = (t.reshape(-1) + 1).astype(np.uint8)
    out = np.zeros(codes.size // 4 + 32, dtype=np.uint8)
    for pos, c in enumerate(codes):
        b, j = divmod(pos, 128)
        out[32 * b + j % 32] |= c << (6 - 2 * (j // 32))
    out[codes.size // 4: codes.size // 4 + 4] = np.frombuffer(np.float32(scale).tobytes(), dtype=np.uint8)
    return out


# -- 1. block codecs --------------------------------------------------------------------------

def _ternary(rng, n, k, zero_block=True):
    t = rng.integers(-1, 2, (n, k)).astype(np.int8)
    if zero_block:
        t[0, :256] = 0  # an all-zero block: llama.cpp's quantizer stores d = 0 there
    return t


@pytest.mark.parametrize("qtype", [Q.TQ2_0, Q.TQ1_0])
def test_tq_codecs_match_gguf_quants(qtype):
    from bitserve.kernels.ondisk import tq1_0_pack, tq2_0_pack
    from bitserve.plugins.gguf_tensors import decode_ternary

    rng = np.random.default_rng(1)
    t = _ternary(rng, 6, 768)
    gamma = float(np.float16(0.0371))
    reference = quants.quantize(t.astype(np.float32) * gamma, qtype)  # llama.cpp's quantizer of T*gamma
    nonzero = (t.reshape(6, 3, 256) != 0).any(-1)
    d = torch.from_numpy(np.where(nonzero, gamma, 0.0).astype(np.float32))
    pack = tq2_0_pack if qtype == Q.TQ2_0 else tq1_0_pack
    assert np.array_equal(pack(torch.from_numpy(t), d).numpy(), reference)
    decoded = decode_ternary(reference, qtype.name, (6, 768))
    assert decoded.dense is None  # one scale per row: kernel layout + multiplier
    assert torch.equal(decoded.to_dense(), torch.from_numpy(quants.dequantize(reference, qtype)))
    assert torch.equal(decoded.row_scale, torch.full((6,), gamma))


@pytest.mark.parametrize("qtype", [Q.TQ2_0, Q.TQ1_0])
def test_tq_blocks_with_different_scales_decode_dense(qtype):
    from bitserve.plugins.gguf_tensors import decode_ternary

    w = np.random.default_rng(2).standard_normal((4, 512)).astype(np.float32)
    data = quants.quantize(w, qtype)  # ordinary float weights: d = max|x| differs per block
    decoded = decode_ternary(data, qtype.name, (4, 512))
    assert decoded.packed is None
    assert torch.equal(decoded.dense, torch.from_numpy(quants.dequantize(data, qtype)))


def test_formats_worked_examples():
    """FORMATS.md §2.1, §2.2, §2.4 byte examples, through gguf.quants and bitserve's decoder."""
    from bitserve.plugins.gguf_tensors import decode_ternary

    w = np.zeros((1, 256), dtype=np.float32)
    w[0, [0, 32, 64, 96]] = [1, -1, 0, 1]
    w[0, 1] = -1
    w *= 1.5
    tq2 = quants.quantize(w, Q.TQ2_0)
    assert tq2[0, 0] == 0x92 and tq2[0, 1] == 0x54 and bytes(tq2[0, 64:66]) == b"\x00\x3e"
    w1 = np.zeros((1, 256), dtype=np.float32)
    w1[0, [0, 32, 64, 96, 128]] = [1, -1, 0, 1, 0]
    w1[0, [240, 244, 248, 252]] = [-1, 1, 1, 0]
    tq1 = quants.quantize(w1, Q.TQ1_0)
    assert tq1[0, 0] == 0xBC and tq1[0, 48] == 0x50
    for data, qtype, ref in ((tq2, "TQ2_0", w), (tq1, "TQ1_0", w1 * 1.0)):
        assert torch.equal(decode_ternary(data, qtype, (1, 256)).to_dense(), torch.from_numpy(ref))

    t = np.zeros((1, 128), dtype=np.int8)
    t[0, [0, 32, 96]] = [1, -1, 1]
    t[0, 1] = -1
    data = i2_s_bytes(t, 1.5)
    assert data.size == 64 and data[0] == 0x86 and data[1] == 0x15 and bytes(data[32:36]) == b"\x00\x00\xc0\x3f"
    decoded = decode_ternary(data, "I2_S", (1, 128))
    assert torch.equal(decoded.to_dense(), torch.from_numpy(t.astype(np.float32) * 1.5))


# -- 2. synthetic llama.cpp-layout files vs a float64 reference --------------------------------

LINEARS = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate", "ffn_up": "up",
           "ffn_down": "down"}


class Synthetic:
    """A random tiny model written as a GGUF file the way llama.cpp / bitnet.cpp lay it out.

    ``ref`` holds float64 tensors in Hugging Face row order, taken from the bytes that were written
    (``gguf.quants.dequantize`` for TQ/Q8_0, the FORMATS.md rule for I2_S, un-permuted for llama)."""

    def __init__(self, path: Path, arch: str, linear: dict[str, str], *, seed=0, hidden=256, ffn=512, layers=2,
                 heads=4, kv_heads=2, vocab=48, embd="F16", output=None, act_key=None, nonuniform=(),
                 out_scales=None, rope_freqs=None):
        rng = np.random.default_rng(seed)
        self.arch, self.heads, self.kv_heads, self.head_dim = arch, heads, kv_heads, hidden // heads
        self.bitnet = arch != "llama"
        self.ternary = {}
        self.out_scale: dict[str, float] = {}
        self.ref: dict[str, np.ndarray] = {}
        self.eps, self.theta = 1e-5, 10000.0
        self.act = act_key or ("relu2" if arch in ("bitnet-b1.58", "bitnet-25") else "silu")
        w = GGUFWriter(str(path), arch)
        w.add_context_length(128)
        w.add_embedding_length(hidden)
        w.add_block_count(layers)
        w.add_feed_forward_length(ffn)
        w.add_head_count(heads)
        w.add_head_count_kv(kv_heads)
        w.add_layer_norm_rms_eps(self.eps)
        w.add_rope_freq_base(self.theta)
        w.add_rope_dimension_count(self.head_dim)
        if act_key:
            w.add_string(f"{arch}.hidden_activation", act_key)
        emb = rng.standard_normal((vocab, hidden)).astype(np.float32) * 0.5
        self._float(w, "token_embd.weight", emb, embd)
        shapes = {"q": (hidden, hidden), "k": (kv_heads * self.head_dim, hidden), "v": (kv_heads * self.head_dim, hidden),
                  "o": (hidden, hidden), "gate": (ffn, hidden), "up": (ffn, hidden), "down": (hidden, ffn)}
        for i in range(layers):
            self._float(w, f"blk.{i}.attn_norm.weight", 1 + 0.2 * rng.standard_normal(hidden), "F32")
            self._float(w, f"blk.{i}.ffn_norm.weight", 1 + 0.2 * rng.standard_normal(hidden), "F32")
            if self.bitnet:
                self._float(w, f"blk.{i}.attn_sub_norm.weight", 1 + 0.2 * rng.standard_normal(hidden), "F32")
                self._float(w, f"blk.{i}.ffn_sub_norm.weight", 1 + 0.2 * rng.standard_normal(ffn), "F32")
            for stem, short in LINEARS.items():
                name = f"blk.{i}.{stem}.weight"
                n, k = shapes[short]
                kind = linear[short]
                if name in nonuniform:
                    hf = rng.standard_normal((n, k)).astype(np.float32) * 0.05  # not ternary: per-block d differs
                else:
                    gamma = float(np.float16(rng.uniform(0.02, 0.08)))
                    hf = _ternary(rng, n, k).astype(np.float32) * gamma
                heads_here = {"q": heads, "k": kv_heads}.get(short) if arch == "llama" else None
                disk = llamacpp_permute(hf, heads_here) if heads_here else hf
                if kind == "I2_S":
                    t = np.sign(disk).astype(np.int8)
                    w.add_tensor(name, i2_s_bytes(t, float(np.abs(disk).max())).view(np.int8), raw_shape=(n, k),
                                 raw_dtype=36)
                    stored = t.astype(np.float64) * float(np.abs(disk).max())
                elif kind in ("TQ1_0", "TQ2_0", "Q8_0"):
                    data = quants.quantize(disk, Q[kind])
                    w.add_tensor(name, data, raw_dtype=Q[kind])
                    stored = quants.dequantize(data, Q[kind]).astype(np.float64)
                else:
                    stored = self._float(w, name, disk, kind)
                self.ref[name] = llamacpp_unpermute(stored, heads_here) if heads_here else stored
                self.ternary[name] = kind in ("TQ1_0", "TQ2_0", "I2_S")
                if out_scales and short in out_scales:  # llama.cpp's optional {1} output multiplier
                    w.add_tensor(f"blk.{i}.{stem}.scale", np.array([out_scales[short]], dtype=np.float32))
                    self.out_scale[name] = float(np.float32(out_scales[short]))
        self._float(w, "output_norm.weight", 1 + 0.2 * rng.standard_normal(hidden), "F32")
        if rope_freqs is not None:
            w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
        if output:
            out = rng.standard_normal((vocab, hidden)).astype(np.float32) * 0.3
            if output == "Q8_0":
                data = quants.quantize(out, Q.Q8_0)
                w.add_tensor("output.weight", data, raw_dtype=Q.Q8_0)
                self.ref["output.weight"] = quants.dequantize(data, Q.Q8_0).astype(np.float64)
            else:
                self._float(w, "output.weight", out, output)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        self.layers, self.vocab = layers, vocab

    def _float(self, w, name, x, kind) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if kind == "F32":
            w.add_tensor(name, x)
            stored = x
        elif kind == "F16":
            w.add_tensor(name, x.astype(np.float16))
            stored = x.astype(np.float16)
        elif kind == "Q4_K":  # gguf.quants only dequantizes Q4_K: random blocks with finite d/dmin
            rng = np.random.default_rng(zlib.crc32(name.encode()))
            rows, blocks = x.shape[0], x.shape[1] // 256
            data = rng.integers(0, 256, (rows * blocks, 144), dtype=np.uint8)
            data[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
            data[:, 2:4] = np.frombuffer(np.float16(0.005).tobytes(), np.uint8)
            data = data.reshape(rows, blocks * 144)
            w.add_tensor(name, data, raw_dtype=Q.Q4_K)
            stored = quants.dequantize(data, Q.Q4_K)
        elif kind == "BF16":
            raw = torch.from_numpy(x).to(torch.bfloat16)
            w.add_tensor(name, raw.view(torch.int16).numpy().view(np.uint8).reshape(*x.shape[:-1], -1),
                         raw_dtype=Q.BF16)
            stored = raw.float().numpy()
        else:
            raise ValueError(kind)
        self.ref[name] = stored.astype(np.float64)
        return self.ref[name]

    # float64 forward: per-token absmax int8 activations before every ternary linear
    def logits(self, ids: list[int]) -> torch.Tensor:
        r = {k: torch.from_numpy(v) for k, v in self.ref.items()}

        def norm(x, wt):
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps) * wt

        def lin(x, name):
            if self.ternary[name]:
                s = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
                x = (x * s).round().clamp(-128, 127) / s
            return (x @ r[name].T) * self.out_scale.get(name, 1.0)

        def rope(x, pos):
            d = x.shape[-1]
            inv = 1.0 / self.theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
            ang = pos[:, None].double() * inv[None]
            cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
            rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
            return x * cos + rot * sin

        act = (lambda g: torch.relu(g) ** 2) if self.act == "relu2" else torch.nn.functional.silu
        t = len(ids)
        x = r["token_embd.weight"][ids]
        pos = torch.arange(t)
        mask = torch.full((t, t), -math.inf, dtype=torch.float64).triu(1)
        for i in range(self.layers):
            p = f"blk.{i}."
            h = norm(x, r[p + "attn_norm.weight"])
            q = rope(lin(h, p + "attn_q.weight").view(t, self.heads, -1), pos)
            k = rope(lin(h, p + "attn_k.weight").view(t, self.kv_heads, -1), pos)
            v = lin(h, p + "attn_v.weight").view(t, self.kv_heads, -1)
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(self.head_dim) + mask
            o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(t, -1)
            if self.bitnet:
                o = norm(o, r[p + "attn_sub_norm.weight"])
            x = x + lin(o, p + "attn_output.weight")
            h = norm(x, r[p + "ffn_norm.weight"])
            g = act(lin(h, p + "ffn_gate.weight")) * lin(h, p + "ffn_up.weight")
            if self.bitnet:
                g = norm(g, r[p + "ffn_sub_norm.weight"])
            x = x + lin(g, p + "ffn_down.weight")
        x = norm(x, r["output_norm.weight"])
        head = r["token_embd.weight"] if (self.bitnet or "output.weight" not in r) else r["output.weight"]
        return x @ head.T


def _compare(syn: Synthetic, path: Path, seed=0):
    ours = load_model(path, dtype="float32", device="cpu")
    assert ours.plugin.name == "gguf"
    gen = torch.Generator().manual_seed(seed)
    for length in (1, 9):
        ids = torch.randint(0, syn.vocab, (length,), generator=gen).tolist()
        ref = syn.logits(ids)
        got = prefill_logits(ours.model, ids).double()
        err = (got - ref).abs().max().item()
        # float32 vs float64: an activation sitting on an int8 rounding boundary may round the other way
        # (one step of 1/127 of a token's max); bugs (permutation, scales, norms, activation) cost O(1)
        assert err <= 1e-2 * ref.abs().max().item(), f"len {length}: max |logit diff| {err:.3g} (max {ref.abs().max():.3g})"
    return ours


ALL = lambda kind: {s: kind for s in LINEARS.values()}  # noqa: E731


def test_llama_tq2_0_matches_reference(tmp_path):
    """llama arch: permuted q/k (TQ2_0), untied Q8_0 output, Q4_K embedding (what llama-quantize gives
    TQ models), one TQ2_0 tensor whose blocks carry different scales (dense fallback), SiLU, GQA."""
    path = tmp_path / "llama.gguf"
    syn = Synthetic(path, "llama", ALL("TQ2_0"), output="Q8_0", nonuniform=("blk.1.ffn_down.weight",), embd="Q4_K")
    ours = _compare(syn, path)
    cfg = ours.config
    assert (cfg.model_type, cfg.hidden_act, cfg.tie_word_embeddings, cfg.attn_sub_norm) == ("llama", "silu", False, False)
    kinds = {type(m).__name__ for m in ours.model.modules()}
    assert {"TernaryLinear", "DequantizedW8Linear"} <= kinds


def test_bitnet_tq1_0_matches_reference(tmp_path):
    """bitnet arch with hidden_activation=relu2: sub-norms, NEOX RoPE (no q/k permutation), tied BF16
    embedding; attention in TQ1_0, FFN in TQ2_0, v in F16 (a dense part of the fused q/k/v), and
    llama.cpp's optional per-tensor output scales on k, v and down."""
    path = tmp_path / "bitnet.gguf"
    kinds = {"q": "TQ1_0", "k": "TQ1_0", "v": "F16", "o": "TQ1_0", "gate": "TQ2_0", "up": "TQ2_0", "down": "TQ2_0"}
    syn = Synthetic(path, "bitnet", kinds, seed=1, embd="BF16", act_key="relu2",
                    out_scales={"k": 1.5, "v": 0.75, "down": 2.0})
    ours = _compare(syn, path)
    cfg = ours.config
    assert (cfg.hidden_act, cfg.tie_word_embeddings, cfg.attn_sub_norm, cfg.ffn_sub_norm) == ("relu2", True, True, True)


def test_bitnet_b158_i2_s_matches_reference(tmp_path):
    """bitnet.cpp's arch name with I2_S linears and no hidden_activation key (ReLU² by default)."""
    path = tmp_path / "i2s.gguf"
    syn = Synthetic(path, "bitnet-b1.58", ALL("I2_S"), seed=2, embd="F32", ffn=384)
    ours = _compare(syn, path)
    assert ours.config.hidden_act == "relu2"
    layer = ours.model.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == "TernaryLinear" and layer.packed.dtype == torch.uint8


def test_upstream_bitnet_without_activation_key_is_silu(tmp_path):
    path = tmp_path / "b.gguf"
    Synthetic(path, "bitnet", ALL("TQ2_0"), layers=1)
    from bitserve.plugins.gguf_checkpoint import GGUFCheckpoint

    assert GGUFCheckpoint(path).config["hidden_act"] == "silu"


def _llama3_factors(head_dim, theta, factor, low, high, ctx):
    """llama.cpp's convert_hf_to_gguf rope_freqs for Llama 3 scaling (restated)."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < ctx / high:
            out.append(1.0)
        elif wavelen > ctx / low:
            out.append(factor)
        else:
            smooth = (ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out)


def test_rope_freqs_tensor_becomes_llama3_scaling(tmp_path):
    from bitserve.plugins.gguf_checkpoint import GGUFCheckpoint

    path = tmp_path / "r.gguf"
    Synthetic(path, "llama", ALL("TQ2_0"), layers=1, rope_freqs=_llama3_factors(64, 10000.0, 8.0, 1.0, 4.0, 8192))
    assert GGUFCheckpoint(path).config["rope_scaling"] == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    Synthetic(path, "llama", ALL("TQ2_0"), layers=1, rope_freqs=_llama3_factors(64, 10000.0, 3.0, 1.0, 4.0, 8192))
    with pytest.raises(CheckpointError, match=r"r\.gguf: tensor 'rope_freqs\.weight' holds RoPE factors"):
        GGUFCheckpoint(path)


def test_dense_llama_gguf_matches_transformers(tmp_path):
    """F32 llama GGUF written with llama.cpp's q/k permutation vs transformers on the HF weights:
    checks the permutation is undone for bitserve's rotate-half RoPE."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)).eval()
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    path = tmp_path / "dense.gguf"
    w = GGUFWriter(str(path), "llama")
    for key, value in (("context_length", 64), ("embedding_length", 128), ("block_count", 2),
                       ("feed_forward_length", 160), ("attention.head_count", 4), ("attention.head_count_kv", 2),
                       ("rope.dimension_count", 32)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(2):
        for hf_name, stem in names.items():
            x = sd[f"model.layers.{i}.{hf_name}.weight"]
            if stem == "attn_q":
                x = llamacpp_permute(x, 4)
            elif stem == "attn_k":
                x = llamacpp_permute(x, 2)
            w.add_tensor(f"blk.{i}.{stem}.weight", np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = load_model(path, dtype="float32", device="cpu")
    ids = [3, 17, 5, 60, 2, 9, 33, 41]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(prefill_logits(ours.model, ids), ref, rtol=1e-4, atol=1e-4)


# -- 3. lossless round trips -------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_ggufs(tmp_path_factory):
    from bitserve.convert_gguf import write_gguf

    out = tmp_path_factory.mktemp("demo_gguf")
    return {lt: write_gguf(DEMO, out / f"demo-{lt}.gguf", linear_type=lt, progress=False)
            for lt in ("tq2_0", "tq1_0", "i2_s")}


@pytest.fixture(scope="module")
def demo_original():
    return load_model(DEMO, dtype="float32", device="cpu")


@pytest.mark.parametrize("linear_type", ["tq2_0", "tq1_0", "i2_s"])
def test_demo_round_trip_logits(demo_ggufs, demo_original, linear_type):
    from bitserve.tokenizer import Tokenizer

    converted = load_model(demo_ggufs[linear_type], dtype="float32", device="cpu")
    assert converted.plugin.name == "gguf"
    assert converted.config == demo_original.config
    tok, tok_gguf = Tokenizer(DEMO), Tokenizer(demo_ggufs[linear_type])
    msgs = [{"role": "user", "content": "Sort the letters of 'dbca'."}]
    ids = tok.encode_chat(msgs)
    assert tok_gguf.encode_chat(msgs) == ids and tok_gguf.decode(ids, False) == tok.decode(ids, False)
    torch.testing.assert_close(prefill_logits(converted.model, ids), prefill_logits(demo_original.model, ids),
                               rtol=1e-6, atol=1e-6)
    # the GGUF is smaller than the safetensors checkpoint and holds the same tensors
    assert converted.checkpoint_bytes < demo_original.checkpoint_bytes * 1.05


def test_literal_u2581_survives_the_gguf_vocabulary(demo_ggufs):
    from bitserve.tokenizer import Tokenizer

    src, gguf = Tokenizer(DEMO), Tokenizer(demo_ggufs["tq2_0"])
    for text in ("a\u2581b", "x \u2581 y", "plain text"):
        ids = src.encode(text)
        assert gguf.encode(text) == ids and gguf.decode(ids) == src.decode(ids) == text


@pytest.mark.parametrize("src_type,dst_type", [("tq2_0", "tq1_0"), ("i2_s", "tq2_0")])
def test_gguf_to_gguf(demo_ggufs, demo_original, src_type, dst_type, tmp_path):
    """A ternary GGUF converts to another GGUF type: same tokenizer, same logits."""
    from bitserve.convert_gguf import write_gguf
    from bitserve.tokenizer import Tokenizer

    out = write_gguf(demo_ggufs[src_type], tmp_path / "again.gguf", linear_type=dst_type, progress=False)
    assert not (tmp_path / "again.gguf.partial").exists()
    converted = load_model(out, dtype="float32", device="cpu")
    assert converted.config == demo_original.config
    msgs = [{"role": "user", "content": "What is 47+89?"}]
    ids = Tokenizer(DEMO).encode_chat(msgs)
    assert Tokenizer(out).encode_chat(msgs) == ids
    torch.testing.assert_close(prefill_logits(converted.model, ids), prefill_logits(demo_original.model, ids),
                               rtol=1e-6, atol=1e-6)


def test_dense_source_is_refused_for_gguf(tmp_path):
    from bitserve.convert_gguf import write_gguf
    from tiny_checkpoints import write_llama_checkpoint

    src = write_llama_checkpoint(tmp_path / "dense")
    with pytest.raises(CheckpointError, match="dense checkpoint has no ternary linears.*--to bitnet"):
        write_gguf(src, tmp_path / "d.gguf", progress=False)
    assert not list(tmp_path.glob("d.gguf*"))


@pytest.mark.parametrize("linear_type", ["tq2_0", "tq1_0", "i2_s"])
def test_written_file_read_by_gguf_library(demo_ggufs, demo_original, linear_type):
    """The writer's output, read by gguf's own reader and dequantized by gguf.quants (I2_S: compared
    with FORMATS.md's encoding of the source), equals the source weights; llama.cpp's keys are there."""
    from gguf import GGUFReader

    path = demo_ggufs[linear_type]
    if linear_type == "i2_s":  # gguf's reader has no type 36: find the tensor's bytes from the table ourselves
        from bitserve.plugins.gguf_file import GGUFFile

        f = GGUFFile(path)
        info = f.tensors["blk.2.ffn_down.weight"]
        layer = demo_original.model.model.layers[2].mlp.down_proj
        t = layer.dequantize() / layer.scale[0]
        expected = i2_s_bytes(t.round().to(torch.int8).numpy(), float(layer.scale[0]))
        assert np.array_equal(np.asarray(f.raw(info.name)), expected)
        assert f.architecture == "bitnet-b1.58" and f.value("general.file_type") == 40
        assert f.value("bitnet-b1.58.hidden_activation") == "relu2"
        return
    r = GGUFReader(str(path))
    meta = {k: v.contents() for k, v in r.fields.items()}
    assert meta["general.architecture"] == "bitnet" and meta["bitnet.hidden_activation"] == "relu2"
    assert meta["general.file_type"] == {"tq2_0": 37, "tq1_0": 36}[linear_type]
    assert (meta["bitnet.block_count"], meta["bitnet.attention.head_count_kv"], meta["bitnet.rope.dimension_count"]) \
        == (4, 2, 64)
    assert meta["tokenizer.ggml.model"] == "llama"
    # the demo's vocabulary has raw spaces, escaped to U+2581 in GGUF tokens: from those alone a
    # literal U+2581 in a text would read back as a space, so the exact tokenizer.json travels too
    assert "tokenizer.huggingface.json" in meta
    assert meta["tokenizer.ggml.tokens"][256] == SPACE  # the demo's " " token, escaped the SentencePiece way
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 1 + 4 * 11 + 1  # token_embd, 11 per block, output_norm (tied: no output.weight)
    for i, layer in enumerate(demo_original.model.model.layers):
        fused = {"attn_q": (layer.self_attn.qkv_proj, 0), "attn_k": (layer.self_attn.qkv_proj, 256),
                 "attn_v": (layer.self_attn.qkv_proj, 384), "ffn_gate": (layer.mlp.gate_up_proj, 0),
                 "ffn_up": (layer.mlp.gate_up_proj, 768), "ffn_down": (layer.mlp.down_proj, 0)}
        for stem, (module, start) in fused.items():
            t = tensors[f"blk.{i}.{stem}.weight"]
            assert t.tensor_type.name == linear_type.upper()
            got = torch.from_numpy(quants.dequantize(t.data, t.tensor_type))
            want = module.dequantize()[start: start + got.shape[0]]
            assert torch.equal(got, want), (i, stem)


def test_demo_round_trip_generations(demo_ggufs):
    """Greedy answers through bitserve.LLM (default dtype, the engine) are identical for every GGUF type."""
    from bitserve import LLM, SamplingParams
    from bitserve.demo.task import make_questions

    questions = [q.messages for q in make_questions(6, seed=3, split="test")]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    expected = [o.token_ids for o in LLM(str(DEMO), device="cpu").chat(questions, params)]
    assert all(len(ids) > 1 for ids in expected)
    for linear_type, path in demo_ggufs.items():
        folder = path.parent / linear_type  # a folder holding one .gguf and nothing else
        folder.mkdir(exist_ok=True)
        shutil.copy(path, folder / path.name)
        for model in (str(path), str(folder)):
            llm = LLM(model, device="cpu")
            assert llm.loaded.plugin.name == "gguf" and llm.model.dtype == torch.bfloat16
            got = [o.token_ids for o in llm.chat(questions, params)]
            assert got == expected, (linear_type, model)


def test_llama_source_round_trip_permutes_qk(tmp_path):
    """A llama-architecture ternary checkpoint goes out with llama.cpp's q/k permutation and comes back equal."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitserve.convert_gguf import write_gguf
    from tiny_checkpoints import write_bitnet_checkpoint, write_char_tokenizer

    config = LlamaConfig(vocab_size=80, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(4)
    state = {k: v.detach().clone() for k, v in LlamaForCausalLM(config).state_dict().items() if "rotary" not in k}
    # bf16 scales: fp16 (the TQ block scale) holds every one of them, so the conversion is lossless
    src = write_bitnet_checkpoint(tmp_path / "src", config, state, dtype=torch.bfloat16)
    write_char_tokenizer(src, config.vocab_size)
    dst = write_gguf(src, tmp_path / "llama.gguf", "tq2_0", progress=False)
    from bitserve.plugins.gguf_checkpoint import GGUFCheckpoint

    assert GGUFCheckpoint(dst).file.architecture == "llama"
    a, b = load_model(src, dtype="float32", device="cpu"), load_model(dst, dtype="float32", device="cpu")
    ids = list(range(3, 40))
    torch.testing.assert_close(prefill_logits(b.model, ids), prefill_logits(a.model, ids), rtol=1e-6, atol=1e-6)


def test_small_hidden_needs_i2_s(tmp_path):
    """TQ blocks are 256 wide: a hidden size of 64 is refused with a pointer to I2_S, which works."""
    from bitserve.convert_gguf import write_gguf
    from bitserve.tokenizer import Tokenizer
    from tiny_checkpoints import write_tiny_bitnet_model

    src = write_tiny_bitnet_model(tmp_path / "tiny")
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_q\.weight.*K=64.*use i2_s"):
        write_gguf(src, tmp_path / "x.gguf", "tq2_0", progress=False)
    dst = write_gguf(src, tmp_path / "tiny.gguf", "i2_s", progress=False)
    a, b = load_model(src, dtype="float32", device="cpu"), load_model(dst, dtype="float32", device="cpu")
    ids = list(range(5, 30))
    torch.testing.assert_close(prefill_logits(b.model, ids), prefill_logits(a.model, ids), rtol=1e-6, atol=1e-6)
    # a WordLevel tokenizer has no GGUF model type: it travels as tokenizer.huggingface.json
    tok_a, tok_b = Tokenizer(src), Tokenizer(dst)
    assert tok_b.encode("hello, world") == tok_a.encode("hello, world")
    assert tok_b.chat_template == tok_a.chat_template and tok_b.eos_token == tok_a.eos_token


# -- 4. tokenizer metadata ---------------------------------------------------------------------

def test_spm_vocab_merges_by_score():
    """tokenizer.ggml.model = llama without merges: highest-score pair first, byte fallback, space prefix."""
    from bitserve.plugins.gguf_tokenizer import tokenizer_from_metadata

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + \
        [SPACE, "a", "b", "c", "ab", SPACE + "a", SPACE + "ab", "bc"]
    scores = [0.0] * 259 + [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -0.5]
    types = [2, 3, 3] + [6] * 256 + [1] * 8
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}
    tok = tokenizer_from_metadata("test.gguf", meta)
    idx = {t: i for i, t in enumerate(tokens)}
    # "▁abc": bc (-0.5) merges first, then ▁a (-2); ▁abc is not a token
    assert tok.encode("abc").ids == [1, idx[SPACE + "a"], idx["bc"]]
    assert tok.encode("ab x", add_special_tokens=False).ids == [idx[SPACE + "ab"], idx[SPACE], 3 + ord("x")]
    assert tok.decode(tok.encode("ab x").ids, skip_special_tokens=True) == "ab x"


def test_byte_level_llama3_vocab_round_trips(tmp_path):
    """A byte-level BPE with the Llama 3 pre-tokenizer is written as gpt2/llama-bpe and rebuilt exactly."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from bitserve.plugins.gguf_tokenizer import tokenizer_from_metadata
    from bitserve.plugins.gguf_vocab_writer import tokenizer_metadata

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["The quick brown fox jumps over the lazy dog. It's 1234 o'clock!\n"] * 20 + \
             ["Tokenizers merge frequent pairs; numbers like 98765 split in threes.\n"] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>", "chat_template": "{{x}}"}))
    meta = {k: v for k, (v, _) in tokenizer_metadata(tmp_path, {"bos_token_id": 0, "eos_token_id": [2, 1]}, 430).items()}
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert "tokenizer.huggingface.json" not in meta  # rebuilt exactly from tokens + merges
    assert (meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.eot_token_id"]) == (2, 1)
    assert meta["tokenizer.ggml.tokens"][425] == "[PAD425]" and meta["tokenizer.ggml.token_type"][425] == 5
    rebuilt = tokenizer_from_metadata("x.gguf", meta)
    for text in ("Hello there, fox 3141592!", "  spaced   out\n\nlines", "émoji 🙂 <|eot_id|> end"):
        assert rebuilt.encode(text).ids == tok.encode(text).ids


def test_sidecar_tokenizer_json_wins(demo_ggufs, tmp_path):
    from bitserve.tokenizer import Tokenizer
    from tiny_checkpoints import write_char_tokenizer

    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(demo_ggufs["tq2_0"], folder / "model.gguf")
    assert Tokenizer(folder).vocab_size == 384
    write_char_tokenizer(folder, 100)  # tokenizer.json + tokenizer_config.json next to the GGUF
    tok = Tokenizer(folder)
    assert tok.vocab_size == 100 and tok.eos_token == "<|eot_id|>"
    assert 352 in tok.eos_token_ids  # GGUF's end-of-generation ids still count


def test_gguf_without_tokenizer_metadata(tmp_path):
    from bitserve.tokenizer import Tokenizer

    path = tmp_path / "bare.gguf"
    Synthetic(path, "bitnet", ALL("TQ2_0"), layers=1)
    with pytest.raises(CheckpointError, match=r"bare\.gguf.*tokenizer\.ggml\.tokens.*tokenizer\.json"):
        Tokenizer(path)


# -- 5. errors ---------------------------------------------------------------------------------

def test_truncated_file(demo_ggufs, tmp_path):
    data = demo_ggufs["tq2_0"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: tensor '[a-z_.0-9]+' .*past the end of the file"):
        load_model(cut, device="cpu")
    cut.write_bytes(data[:200])  # inside the metadata
    with pytest.raises(CheckpointError, match=r"cut\.gguf: not a readable GGUF file"):
        load_model(cut, device="cpu")
    cut.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"cut\.gguf"):
        load_model(cut, device="cpu")


def _type_offset(path: Path, tensor: str) -> int:
    """Byte offset of one tensor's GGML type id in the tensor table (the u32 after its dims)."""
    from gguf import GGUFReader

    field = next(t.field for t in GGUFReader(str(path)).tensors if t.name == tensor)
    return field.offset + sum(int(p.nbytes) for p in field.parts[:4])


def _patch(path: Path, offset: int, value: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset: offset + 4] = np.uint32(value).tobytes()
    path.write_bytes(bytes(raw))


def test_unknown_ggml_type(tmp_path):
    path = tmp_path / "u.gguf"
    Synthetic(path, "llama", ALL("TQ2_0"), layers=1)
    offset = _type_offset(path, "blk.0.ffn_up.weight")
    _patch(path, offset, 99)
    with pytest.raises(CheckpointError, match=r"u\.gguf: tensor 'blk\.0\.ffn_up\.weight' has unknown GGML type id 99"):
        load_model(path, device="cpu")
    _patch(path, offset, 36)  # I2_S is a bitnet.cpp type: not in a llama file
    with pytest.raises(CheckpointError, match=r"'blk\.0\.ffn_up\.weight' has unknown GGML type id 36 \(I2_S"):
        load_model(path, device="cpu")
    _patch(path, offset, int(Q.Q1_0))  # gguf knows it (18 bytes per 128, fits the slot) but cannot dequantize it
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.0\.ffn_up\.weight' \(model\.layers\.0\.mlp\.up_proj"
                                              r"\.weight\) has GGML type Q1_0, which bitserve does not run"):
        load_model(path, device="cpu")


def test_wrong_shape_and_type(tmp_path):
    path = tmp_path / "s.gguf"
    Synthetic(path, "bitnet", ALL("TQ2_0"), layers=1)
    from bitserve.plugins.gguf_checkpoint import GGUFCheckpoint

    ckpt = GGUFCheckpoint(path)
    with pytest.raises(CheckpointError, match=r"s\.gguf: tensor 'blk\.0\.attn_q\.weight' "
                                              r"\(model\.layers\.0\.self_attn\.q_proj\.weight\) has shape \[256, 256\]"):
        ckpt.ternary("model.layers.0.self_attn.q_proj.weight", (512, 256))
    with pytest.raises(CheckpointError, match=r"'blk\.0\.attn_q\.weight' .* has GGML type TQ2_0, expected one of"):
        ckpt.get("model.layers.0.self_attn.q_proj.weight")
    # a file whose head counts do not match its q/k tensors fails while loading, naming the tensor
    bad = tmp_path / "h.gguf"
    Synthetic(bad, "bitnet", ALL("TQ2_0"), layers=1, kv_heads=2)
    key = b"bitnet.attention.head_count_kv"
    _patch(bad, bad.read_bytes().index(key) + len(key) + 4, 4)  # key, u32 value type, then the value
    with pytest.raises(CheckpointError, match=r"h\.gguf: tensor 'blk\.0\.attn_k\.weight' .*has shape \[128, 256\], "
                                              r"expected \[256, 256\]"):
        load_model(bad, device="cpu")


def test_block_count_and_nan_checks(tmp_path):
    """Metadata that declares fewer blocks than the file holds, or none, and a NaN in an F16 linear
    fail naming the file; messages about the architecture say it came from the GGUF metadata."""
    from gguf import GGUFReader

    path = tmp_path / "b.gguf"
    Synthetic(path, "bitnet", ALL("TQ2_0"), layers=2)
    key = b"bitnet.block_count"
    at = path.read_bytes().index(key) + len(key) + 4  # key, u32 value type, then the value
    _patch(path, at, 1)
    with pytest.raises(CheckpointError, match=r"b\.gguf: the checkpoint has tensors of layer 1 .* declares 1 layer"):
        load_model(path, device="cpu")
    _patch(path, at, 0)
    with pytest.raises(CheckpointError, match=r"b\.gguf \(metadata\): num_hidden_layers must be >= 1"):
        load_model(path, device="cpu")
    nan = tmp_path / "n.gguf"
    Synthetic(nan, "bitnet", {**ALL("TQ2_0"), "v": "F16"}, layers=1)
    load_model(nan, device="cpu")
    tensor = next(t for t in GGUFReader(str(nan)).tensors if t.name == "blk.0.attn_v.weight")
    raw = bytearray(nan.read_bytes())
    raw[int(tensor.data_offset) + 6: int(tensor.data_offset) + 8] = np.float16(np.nan).tobytes()
    nan.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"n\.gguf: tensor 'blk\.0\.attn_v\.weight' .*NaN or Inf"):
        load_model(nan, device="cpu")


def test_two_gguf_files_in_one_folder(demo_ggufs, tmp_path):
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(demo_ggufs["tq2_0"], tmp_path / name)
    with pytest.raises(CheckpointError, match=r"holds 2 GGUF files \(a\.gguf, b\.gguf\)"):
        load_model(tmp_path, device="cpu")


# -- 6. the plugin contract --------------------------------------------------------------------

@pytest.mark.parametrize("arch,kind", [("llama", "TQ2_0"), ("bitnet", "TQ1_0"), ("bitnet-b1.58", "I2_S")])
def test_check_format_contract(tmp_path, arch, kind):
    import bitserve.plugins.testing as testing
    from bitserve.plugins.base import LinearSpec

    folder = tmp_path / "ckpt"
    folder.mkdir()
    syn = Synthetic(folder / "model.gguf", arch, ALL(kind), layers=1, ffn=512)
    p = "model.layers.0"
    groups = [[LinearSpec(f"{p}.self_attn.q_proj", 256, 256), LinearSpec(f"{p}.self_attn.k_proj", 128, 256),
               LinearSpec(f"{p}.self_attn.v_proj", 128, 256)],
              [LinearSpec(f"{p}.mlp.gate_proj", 512, 256), LinearSpec(f"{p}.mlp.up_proj", 512, 256)],
              [LinearSpec(f"{p}.mlp.down_proj", 256, 512)]]
    hf_of = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
             "down_proj": "ffn_down"}
    expected = {s.prefix: torch.from_numpy(syn.ref[f"blk.0.{hf_of[s.prefix.rsplit('.', 1)[1]]}.weight"])
                for g in groups for s in g}
    report = testing.check_format("gguf", folder, groups, expected_weights=expected, max_bits_per_weight=2.6)
    assert all(b < 2.6 for b in report["bits_per_weight"])


@pytest.mark.parametrize("type_id,name", [(37, "I8_S"), (38, "TL1"), (39, "TL2")])
def test_bitnet_cpp_lookup_table_types_are_refused_by_name(tmp_path, type_id, name):
    """bitnet.cpp reuses ids 37-39 (39 is upstream MXFP4): in its architectures they are its
    I8_S / TL1 / TL2 layouts, refused by name instead of decoded as something else."""
    path = tmp_path / "tl.gguf"
    Synthetic(path, "bitnet-b1.58", ALL("TQ2_0"), layers=1)  # (gguf's reader cannot open I2_S files)
    _patch(path, _type_offset(path, "blk.0.ffn_down.weight"), type_id)
    with pytest.raises(CheckpointError, match=rf"'blk\.0\.ffn_down\.weight' has bitnet\.cpp type {name} \(id {type_id}\)"):
        load_model(path, device="cpu")
