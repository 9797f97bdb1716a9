"""``--int8-lm-head``: the LM head quantized to int8 per row at load (W8A16 kernels)."""

import torch

from bitserve import LLM, SamplingParams
from bitserve.demo.task import check, make_questions
from bitserve.loader import load_model
from bitserve.model.prefill import prefill_logits
from bitserve.plugins.lowbit_layers import Int8LMHead
from tiny_checkpoints import write_llama_checkpoint

IDS = [1, 17, 5, 60, 33, 2, 9, 41]


def test_untied_head_is_replaced_and_matches_its_dequantized_weight(tmp_path):
    folder = write_llama_checkpoint(tmp_path / "llama", seed=4)
    dense = load_model(folder, dtype="float32", device="cpu", progress=False)
    quant = load_model(folder, dtype="float32", device="cpu", progress=False, int8_lm_head=True)
    assert isinstance(quant.model.int8_lm_head, Int8LMHead)
    assert not hasattr(quant.model, "lm_head"), "the float head must be dropped"
    assert quant.weight_bytes < dense.weight_bytes
    head = dense.model.lm_head.weight
    hidden = torch.randn(5, head.shape[1], generator=torch.Generator().manual_seed(0))
    # exact function of the int8 head: hidden @ (q * scale).T
    want = (hidden.double() @ quant.model.int8_lm_head.dequantize().double().t())
    got = quant.model.compute_logits(hidden).double()
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    # and close to the float head: absmax int8 per row moves each weight by at most max|w[n]| / 254,
    # so logit [m, n] by at most sum|h[m]| * max|w[n]| / 254
    bound = hidden.abs().sum(1, keepdim=True).double() * head.abs().amax(dim=1).double()[None, :] / 254
    ref = hidden.double() @ head.double().t()
    assert ((got - ref).abs() <= bound + 1e-6).all()
    assert torch.equal(quant.model.lm_head_weight(), quant.model.int8_lm_head.dequantize())


def test_demo_with_int8_head_keeps_its_answers():
    base = LLM(dtype="float32", device="cpu")
    quant = LLM(dtype="float32", device="cpu", int8_lm_head=True)
    assert quant.model.config.tie_word_embeddings and quant.model.int8_lm_head is not None
    a, b = base.logits(IDS), quant.logits(IDS)
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    questions = make_questions(60, seed=7, split="test")
    outs = quant.chat([q.messages for q in questions], SamplingParams(temperature=0.0, max_tokens=16))
    accuracy = sum(check(q, o.text) for q, o in zip(questions, outs)) / len(questions)
    assert accuracy >= 0.9, accuracy


def test_prefill_logits_use_the_int8_head(tmp_path):
    folder = write_llama_checkpoint(tmp_path / "llama", seed=5)
    quant = load_model(folder, dtype="float32", device="cpu", progress=False, int8_lm_head=True)
    logits = prefill_logits(quant.model, IDS)
    assert logits.shape == (len(IDS), 96) and torch.isfinite(logits).all()
