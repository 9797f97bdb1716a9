"""The bundled demo model: layout, accuracy floor through the offline API, and an
independent check with transformers' BitNetForCausalLM (which validates the packed
2B-4T layout without any bitserve code)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # before transformers is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

from bitserve.demo import DEMO_MODEL_PATH  # noqa: E402
from bitserve.demo.task import SKILLS, check, make_questions, split_of  # noqa: E402

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def _greedy():
    from bitserve import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=16)


@pytest.fixture(scope="module")
def llm():
    from bitserve import LLM

    return LLM(str(DEMO_MODEL_PATH))


def test_demo_files_and_layout():
    from safetensors import safe_open

    for name in FILES:
        assert (DEMO_MODEL_PATH / name).is_file(), name
    total = sum((DEMO_MODEL_PATH / n).stat().st_size for n in FILES)
    assert total < 8 * 2**20, f"demo model is {total} bytes"
    cfg = json.loads((DEMO_MODEL_PATH / "config.json").read_text())
    assert cfg["architectures"] == ["BitNetForCausalLM"] and cfg["model_type"] == "bitnet"
    assert cfg["quantization_config"] == {
        "quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}
    assert cfg["tie_word_embeddings"] is True and cfg["hidden_act"] == "relu2"
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {"self_attn.q_proj": (nq * d, h), "self_attn.k_proj": (nkv * d, h), "self_attn.v_proj": (nkv * d, h),
              "self_attn.o_proj": (h, nq * d), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
              "mlp.down_proj": (h, i)}
    with safe_open(str(DEMO_MODEL_PATH / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        for layer in range(cfg["num_hidden_layers"]):
            for proj, (n, k) in shapes.items():
                w = f.get_tensor(f"model.layers.{layer}.{proj}.weight")
                s = f.get_tensor(f"model.layers.{layer}.{proj}.weight_scale")
                assert w.dtype == torch.uint8 and tuple(w.shape) == (n // 4, k), proj
                assert s.dtype == torch.bfloat16 and tuple(s.shape) == (1,) and float(s) > 0, proj
                codes = torch.stack([(w >> (2 * j)) & 3 for j in range(4)])
                assert int(codes.max()) <= 2, f"{proj}: code 3 is not a ternary value"


def test_task_is_deterministic_and_disjoint():
    a = make_questions(60, seed=7, split="test")
    assert a == make_questions(60, seed=7, split="test")
    assert {q.skill for q in a} == set(SKILLS)
    assert all(split_of(q.text) == "test" for q in a)
    train = make_questions(600, seed=7, split="train")
    assert all(split_of(q.text) == "train" for q in train)
    assert not {q.text for q in a} & {q.text for q in train}
    q = a[0]
    assert check(q, f" {q.answer}\n") and not check(q, q.answer + "0")


def test_demo_accuracy_floor(llm):
    questions = make_questions(60, seed=99, split="test")  # 10 per skill
    outs = llm.chat([q.messages for q in questions], _greedy())
    ok = [check(q, o.text) for q, o in zip(questions, outs)]
    wrong = [(q.text, q.answer, o.text) for q, o, good in zip(questions, outs, ok) if not good]
    # measured 0.988 on 600 held-out questions (multiplication 0.94); 60 is a small sample
    assert sum(ok) / len(ok) >= 0.9, wrong


def test_demo_default_model_and_system_prompt(llm):
    q = make_questions(1, seed=5, split="test")[0]
    conv = [{"role": "system", "content": "You are a helpful assistant."}] + q.messages
    out = llm.chat(conv, _greedy())[0]
    assert out.finish_reason == "stop"
    assert check(q, out.text), (q.text, q.answer, out.text)


def test_transformers_oracle_agrees():
    """transformers loads the packed checkpoint itself and answers like the checker expects
    (and exactly like bitserve)."""
    from transformers import AutoTokenizer, BitNetForCausalLM

    tok = AutoTokenizer.from_pretrained(str(DEMO_MODEL_PATH))
    # the checkpoint's own dtype (bf16), as bitserve's LLM() runs it by default
    model = BitNetForCausalLM.from_pretrained(str(DEMO_MODEL_PATH), dtype=torch.bfloat16).eval()
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "AutoBitLinear"
    questions = make_questions(6, seed=3, split="test")  # one per skill
    answers = []
    for q in questions:
        ids = tok.apply_chat_template(q.messages, add_generation_prompt=True, return_dict=True,
                                      return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        answers.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    assert [check(q, a) for q, a in zip(questions, answers)] == [True] * len(questions), \
        list(zip([q.text for q in questions], answers))
    from bitserve import LLM

    ours = LLM(str(DEMO_MODEL_PATH)).chat([q.messages for q in questions], _greedy())
    assert [o.text for o in ours] == answers


def test_token_id_prompts_may_be_numpy_or_torch():
    import numpy as np
    import torch

    from bitserve import LLM, SamplingParams

    llm = LLM()
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    ids = llm.tokenizer.encode("What is 2+2?")
    want = llm.generate([ids], params)[0].token_ids
    for prompt in (np.array(ids), [np.int64(i) for i in ids], torch.tensor(ids)):
        assert llm.generate(prompt, params)[0].token_ids == want
    assert [o.token_ids for o in llm.generate(np.array([ids, ids]), params)] == [want, want]
