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
]


@pytest.mark.parametrize("script,argv,option", BAD, ids=[f"{s}{' '.join(a)}" for s, a, _ in BAD])
def test_bad_option_is_a_usage_error(script, argv, option, capsys):
    module = load_script(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and option in err


def test_format_accuracy_names_the_rows_for_an_unknown_label(capsys):
    module = load_script("format_accuracy")
    with pytest.raises(SystemExit):
        module.main(["--only", "gguf,nosuch"])
    err = capsys.readouterr().err
    assert "nosuch" in err and all(row.label in err for row in module.ROWS)


def test_kernel_bench_options(capsys):
    from bitserve.kernels import bench

    for argv, option in ((["--ops", "w2a8,w3a8"], "--ops"), (["--budget-s", "0"], "--budget-s")):
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
