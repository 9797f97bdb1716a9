"""The benchmark scripts refuse bad options with a usage error (exit 2, the option named), before
any work: never a traceback halfway through a run."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

from bitserve.cli_args import int_list, non_negative_int, positive_int

REPO = Path(__file__).resolve().parent.parent


def load_script(name: str):
    path = REPO / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    sys.path.insert(0, str(path.parent))  # scripts import their siblings (engine_throughput)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


BAD = [
    ("demo_accuracy", ["--n", "0"], "--n"),
    ("demo_accuracy", ["--batch", "-3"], "--batch"),
    ("demo_accuracy", ["--show-errors", "-1"], "--show-errors"),
    ("kv_cache_quality", ["--n", "0"], "--n"),
    ("kv_cache_quality", ["--sink-tokens", "-2"], "--sink-tokens"),
    ("kv_cache_quality", ["--dtypes", "int8,int3"], "--dtypes"),
    ("kv_cache_throughput", ["--head-dim", "0"], "--head-dim"),
    ("kv_gpu_check", ["--iters", "0"], "--iters"),
    ("mixed_steps", ["--steps", "0"], "--steps"),
    ("mixed_steps", ["--warmup", "-1"], "--warmup"),
    ("ray_replicas", ["--requests", "0"], "--requests"),
    ("ray_replicas", ["--prompt-len", "48,16"], "--prompt-len"),
    ("ray_replicas", ["--prompt-len", "16"], "--prompt-len"),
    ("engine_throughput", ["--concurrency", "1,0"], "--concurrency"),
    ("engine_throughput", ["--repeats", "0"], "--repeats"),
    ("kernel_sass", ["--arch", "75"], "--arch"),
    ("format_accuracy", ["--only", "nosuchlabel"], "--only"),
    ("format_accuracy", ["--n", "0"], "--n"),
    ("host_overhead", ["--steps", "0"], "--steps"),
    ("bitnet_2b4t_memory", ["--threads", "0"], "--threads"),
    ("profile_linear", ["--m", "0"], "--m"),
    # ranges that depend on the model, the data or another option
    ("demo_accuracy", ["--n", "1083"], "--n"),  # the test split has 180 distinct mul questions
    ("kv_cache_quality", ["--ppl-n", "0"], "--ppl-n"),
    ("kv_cache_quality", ["--sink-tokens", "65"], "--sink-tokens"),  # int4/int2 blocks hold 64
    ("kv_cache_quality", ["--dtypes", "int8", "--block-size", "0"], "--block-size"),
    ("kv_cache_throughput", ["--dtypes", "int8,int3"], "--dtypes"),
    ("kv_cache_throughput", ["--heads", "20", "--kv-heads", "6"], "--heads"),
    ("kv_cache_throughput", ["--dtypes", "int2", "--head-dim", "6"], "--head-dim"),
    ("kv_cache_throughput", ["--device", "nosuch"], "--device"),
    ("kv_gpu_check", ["--prefill", "4096"], "--prefill"),
    ("kv_gpu_check", ["--device", "tpu"], "--device"),
    ("mixed_steps", ["--modes", ","], "--modes"),
    ("mixed_steps", ["--modes", "eager,fast"], "--modes"),
    ("mixed_steps", ["--device", "tpu"], "--device"),
    ("ray_replicas", ["--prompt-len", "8,16,32"], "--prompt-len"),
    ("ray_replicas", ["--num-cpus", "1"], "--num-cpus"),  # 2 replicas reserve a CPU each
    ("ray_replicas", ["--max-tokens", "250"], "--max-tokens"),  # + 48 prompt tokens > 256 positions
    ("engine_throughput", ["--models", "demo,gpt2"], "--models"),
    ("engine_throughput", ["--models", ","], "--models"),
    ("engine_throughput", ["--models", "random1024", "--random-max-tokens", "193"], "--random-max-tokens"),
    ("engine_throughput", ["--models", "demo", "--demo-max-tokens", "236"], "--demo-max-tokens"),
    ("format_accuracy", ["--n", "1083"], "--n"),
    ("host_overhead", ["--batches", "1,0"], "--batches"),
    ("host_overhead", ["--context", "-1"], "--context"),
    ("bitnet_2b4t_memory", ["--decode-steps", "0"], "--decode-steps"),
    ("profile_linear", ["--k", "2562"], "--k"),  # packed 4 per byte
    # more of the reported kinds: zero/negative counts, unknown names, a bad arch
    ("mixed_steps", ["--seqs", "-4"], "--seqs"),
    ("mixed_steps", ["--layers", "0"], "--layers"),
    ("ray_replicas", ["--ttft-requests", "0"], "--ttft-requests"),
    ("ray_replicas", ["--num-cpus", "0"], "--num-cpus"),
    ("ray_replicas", ["--prompt-len", "0,16"], "--prompt-len"),
    ("engine_throughput", ["--concurrency", "0"], "--concurrency"),
    ("engine_throughput", ["--threads", "0"], "--threads"),
    ("kv_cache_throughput", ["--seqs", "0"], "--seqs"),
    ("kernel_sass", ["--arch", "0"], "--arch"),
    ("host_overhead", ["--batches", "8,x"], "--batches"),
    ("bitnet_2b4t_memory", ["--layers", "0"], "--layers"),
]


@pytest.mark.parametrize("script,argv,option", BAD, ids=[f"{s}{' '.join(a)}" for s, a, _ in BAD])
def test_bad_option_is_a_usage_error(script, argv, option, capsys):
    module = load_script(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and option in err


def test_format_accuracy_names_the_rows_for_an_unknown_label(capsys, tmp_path):
    module = load_script("format_accuracy")
    with pytest.raises(SystemExit):
        module.main(["--only", "gguf,nosuch", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "nosuch" in err and all(row.label in err for row in module.ROWS)
    assert not (tmp_path / "out").exists()  # refused before it empties or converts anything


@pytest.mark.parametrize("script,option", [("format_accuracy", "--only"), ("engine_throughput", "--models"),
                                           ("kv_cache_quality", "--dtypes"), ("mixed_steps", "--modes")])
def test_name_lists_name_the_valid_choices(script, option, capsys):
    module = load_script(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main([option, "nosuchname"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and "nosuchname" in err
    valid = {"format_accuracy": [r.label for r in getattr(module, "ROWS", [])],
             "engine_throughput": ["demo", "random1024"], "kv_cache_quality": ["int8", "int4", "int2"],
             "mixed_steps": list(getattr(module, "MODES", []))}[script]
    assert valid and all(name in err for name in valid)


def test_format_accuracy_dense_row_says_fp32():
    """bits_per_weight counts the weights as loaded (fp32 on CPU): the dense row must not pass them off as bf16."""
    module = load_script("format_accuracy")
    (dense,) = [r for r in module.ROWS if r.fmt == "dense"]
    assert "fp32" in dense.label


def test_kernel_bench_options(capsys):
    from bitserve.kernels import bench

    for argv, option in ((["--ops", "w2a8,w3a8"], "--ops"), (["--ops", ""], "--ops"), (["--budget-s", "0"], "--budget-s"),
                         (["--budget-s", "nan"], "--budget-s")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2 and option in capsys.readouterr().err


def test_argparse_types():
    assert positive_int("3") == 3 and non_negative_int("0") == 0
    assert int_list("1, 8,32") == [1, 8, 32] and int_list("0,2", 0) == [0, 2]
    for parse, text in ((positive_int, "0"), (positive_int, "x"), (non_negative_int, "-1"), (int_list, ""),
                        (int_list, "1,0"), (int_list, "1,,a")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
