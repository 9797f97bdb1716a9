"""SamplingParams: vLLM names, defaults, validation messages naming the field, CLI compatibility."""

import argparse
import dataclasses
import math

import pytest

from bitserve.cli_args import add_dataclass_arguments, dataclass_from_args
from bitserve.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.logit_bias == {} and p.min_tokens == 0 and p.logprobs is None and p.n == 1
    assert p.skip_special_tokens is True and p.include_stop_str_in_output is False
    assert p.stop == [] and p.stop_token_ids == [] and p.seed is None and not p.ignore_eos
    assert not p.greedy


@pytest.mark.parametrize("temperature, greedy", [(0, True), (0.0, True), (1e-6, True), (1e-4, False), (0.7, False)])
def test_greedy_property(temperature, greedy):
    assert SamplingParams(temperature=temperature).greedy is greedy


BAD = [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "1"),
    ("top_p", 0), ("top_p", 1.01), ("top_p", math.nan),
    ("top_k", -2), ("top_k", 1.5), ("top_k", True),
    ("min_p", -0.01), ("min_p", 1.5), ("min_p", math.nan),
    ("repetition_penalty", 0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("presence_penalty", 2.01), ("presence_penalty", -2.5), ("presence_penalty", math.nan),
    ("frequency_penalty", 3), ("frequency_penalty", -2.01),
    ("max_tokens", 0), ("max_tokens", 2.0),
    ("min_tokens", -1), ("min_tokens", 1.0),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 2.0),
    ("n", 0), ("n", 1.0),
    ("seed", 1.5), ("seed", "7"),
    ("stop", [""]), ("stop", ["ok", 3]),
    ("stop_token_ids", [-1]), ("stop_token_ids", [1.0]),
    ("logit_bias", {-1: 1.0}), ("logit_bias", {"abc": 1.0}), ("logit_bias", {1.5: 1.0}),
    ("logit_bias", {3: math.nan}), ("logit_bias", {3: "high"}), ("logit_bias", [(1, 2.0)]),
    ("skip_special_tokens", "yes"), ("include_stop_str_in_output", 1), ("ignore_eos", None),
]


@pytest.mark.parametrize("name, value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_invalid_values_name_the_field(name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    assert SamplingParams(max_tokens=4, min_tokens=4).min_tokens == 4


@pytest.mark.parametrize("kwargs", [
    {"top_p": 1.0}, {"top_p": 1e-9}, {"top_k": -1}, {"top_k": 0}, {"top_k": 1}, {"min_p": 0.0}, {"min_p": 1.0},
    {"presence_penalty": -2.0}, {"presence_penalty": 2.0}, {"frequency_penalty": -2}, {"frequency_penalty": 2},
    {"repetition_penalty": 1e-3}, {"repetition_penalty": 5}, {"logprobs": 0}, {"logprobs": 20}, {"n": 8},
    {"temperature": 0}, {"temperature": 100}, {"seed": -3}, {"seed": 2**63}, {"min_tokens": 0},
])
def test_boundary_values_accepted(kwargs):
    p = SamplingParams(**kwargs)
    for k, v in kwargs.items():
        assert getattr(p, k) == v


def test_logit_bias_clamped_and_keys_converted():
    p = SamplingParams(logit_bias={5: 500, 6: -1e9, "7": 3, 8: -100})
    assert p.logit_bias == {5: 100.0, 6: -100.0, 7: 3.0, 8: -100.0}
    assert all(type(k) is int and type(v) is float for k, v in p.logit_bias.items())
    assert SamplingParams(logit_bias=None).logit_bias == {}


def test_stop_string_promoted_to_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=None).stop == []


def test_validate_for_vocab():
    p = SamplingParams(logit_bias={99: 1.0}, stop_token_ids=[98])
    p.validate_for_vocab(100)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={100: 1.0}).validate_for_vocab(100)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[3, 100]).validate_for_vocab(100)


def test_every_field_documented_for_the_cli():
    for f in dataclasses.fields(SamplingParams):
        assert f.metadata.get("help"), f"{f.name} has no help text"


def test_cli_flags_round_trip():
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, SamplingParams, skip=("logit_bias",))
    args = parser.parse_args([
        "--min-p", "0.2", "--n", "3", "--logprobs", "5", "--no-skip-special-tokens", "--repetition-penalty", "1.3",
        "--presence-penalty", "-0.5", "--frequency-penalty", "0.5", "--min-tokens", "2", "--stop", "a", "--stop", "b",
        "--include-stop-str-in-output",
    ])
    p = dataclass_from_args(SamplingParams, args)
    assert (p.min_p, p.n, p.logprobs, p.skip_special_tokens) == (0.2, 3, 5, False)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.3, -0.5, 0.5)
    assert p.min_tokens == 2 and p.stop == ["a", "b"] and p.include_stop_str_in_output
    assert dataclass_from_args(SamplingParams, parser.parse_args([])) == SamplingParams()


def test_stop_strings_are_bounded():
    from bitserve.sampling_params import MAX_STOP_CHARS, MAX_STOP_STRINGS

    SamplingParams(stop=["x"] * MAX_STOP_STRINGS)
    SamplingParams(stop=["y" * MAX_STOP_CHARS])
    with pytest.raises(ValueError, match="at most"):
        SamplingParams(stop=["x"] * (MAX_STOP_STRINGS + 1))
    with pytest.raises(ValueError, match="at most"):
        SamplingParams(stop=["y" * (MAX_STOP_CHARS + 1)])
