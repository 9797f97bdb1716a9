"""Packaging and layering rules, checked on the source tree."""

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("server", "plugins", "kernels")
HEAVY = ("grpc", "prometheus_client", "ray")
HEAVY_ALLOWED_PREFIXES = ("bitserve.rpc", "bitserve.metrics", "bitserve.replica", "bitserve.v1")  # v1 = generated stubs


def _setuptools():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_dirs():
    """{folder relative to ROOT: import name} from pyproject's package-dir."""
    return {Path(folder): name for name, folder in _setuptools()["package-dir"].items()}


def _import_name(path: Path) -> str:
    """Import name of a source file or package folder (relative to ROOT) via package-dir."""
    rel = path.relative_to(ROOT) if path.is_absolute() else path
    best = None
    for folder, name in _package_dirs().items():
        if rel == folder or folder in rel.parents:
            if best is None or len(folder.parts) > len(best[0].parts):
                best = (folder, name)
    assert best is not None, f"{rel} is not under any package-dir"
    folder, name = best
    parts = list(rel.relative_to(folder).parts)
    if parts and parts[-1].endswith(".py"):
        parts[-1] = parts[-1][:-3]
        if parts[-1] == "__init__":
            parts.pop()
    return ".".join([name, *parts])


def _modules():
    for d in SOURCE_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            yield path, _import_name(path)


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Absolute names of every module imported anywhere in ``source`` (relative imports resolved)."""
    found = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            # `from pkg import sub` may import the submodule pkg.sub
            found.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def _is_server(name: str) -> bool:
    """A bitserve module that is not part of bitserve.plugins / bitserve.kernels."""
    if name == "bitserve":
        return True
    if not name.startswith("bitserve."):
        return False
    return name.split(".")[1] not in ("plugins", "kernels")


def _violations():
    bad = []
    for path, module in _modules():
        names = imported_modules(path.read_text(), module, path.name == "__init__.py")
        rel = path.relative_to(ROOT)
        if module.startswith("bitserve.kernels"):
            bad += [f"{rel}: kernels import {n}" for n in names
                    if n == "bitserve" or (n.startswith("bitserve.") and not n.startswith("bitserve.kernels"))]
        elif module.startswith("bitserve.plugins"):
            bad += [f"{rel}: plugins import server module {n}" for n in names if _is_server(n)]
        if not module.startswith(HEAVY_ALLOWED_PREFIXES):
            bad += [f"{rel}: imports {n}" for n in names if n.split(".")[0] in HEAVY]
    return bad


# -- the checker itself must catch what it is meant to catch --------------------------------------
@pytest.mark.parametrize(
    "source,module,expected",
    [
        ("import bitserve.loader", "bitserve.kernels.x", {"bitserve.loader"}),
        ("from .. import loader", "bitserve.kernels.x", {"bitserve", "bitserve.loader"}),
        ("from ..plugins.base import A", "bitserve.kernels.x", {"bitserve.plugins.base", "bitserve.plugins.base.A"}),
        ("def f():\n    import grpc.aio\n", "bitserve.llm", {"grpc.aio"}),
        ("from . import packing", "bitserve.kernels", {"bitserve.kernels", "bitserve.kernels.packing"}),
    ],
)
def test_import_scanner(source, module, expected):
    assert imported_modules(source, module, is_package=module == "bitserve.kernels") == expected


def test_server_classifier():
    assert _is_server("bitserve") and _is_server("bitserve.loader") and _is_server("bitserve.model.llama")
    assert not _is_server("bitserve.plugins.base") and not _is_server("bitserve.kernels")
    assert not _is_server("torch") and not _is_server("bitservex")


def test_import_name_mapping():
    assert _import_name(ROOT / "server" / "model" / "__init__.py") == "bitserve.model"
    assert _import_name(ROOT / "plugins" / "bitnet.py") == "bitserve.plugins.bitnet"
    assert _import_name(ROOT / "kernels") == "bitserve.kernels"


# -- the rules ------------------------------------------------------------------------------------
def test_every_package_is_listed():
    listed = set(_setuptools()["packages"])
    found = {_import_name(init.parent) for d in SOURCE_DIRS for init in (ROOT / d).rglob("__init__.py")}
    assert {"bitserve", "bitserve.plugins", "bitserve.kernels", "bitserve.model"} <= found
    missing = sorted(found - listed)
    assert not missing, f"packages with __init__.py missing from pyproject [tool.setuptools] packages: {missing}"
    stale = sorted(listed - found)
    assert not stale, f"pyproject lists packages that do not exist: {stale}"


def test_package_dir_maps_the_three_folders():
    assert {str(k): v for k, v in _package_dirs().items()} == {
        "server": "bitserve", "plugins": "bitserve.plugins", "kernels": "bitserve.kernels"}


def test_import_direction_and_heavy_deps():
    assert list(_modules()), "no source files found"
    bad = _violations()
    assert not bad, "layering violations:\n" + "\n".join(bad)


def _run(code: str, cwd: Path) -> str:
    env = {"PATH": "/usr/bin:/bin", "TORCHDYNAMO_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_no_top_level_folder_modules(tmp_path):
    # run outside the repo so that only site-packages (and the editable finder) are on the path
    code = (
        "import importlib.util, json\n"
        "out = {}\n"
        "for name in ('server', 'plugins', 'kernels', 'bitserve', 'bitserve.plugins', 'bitserve.kernels'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    out[name] = None if spec is None else (spec.origin or str(list(spec.submodule_search_locations)))\n"
        "print(json.dumps(out))\n"
    )
    found = json.loads(_run(code, tmp_path))
    for name in ("server", "plugins", "kernels"):
        assert found[name] is None or str(ROOT) not in found[name], f"top-level '{name}' importable: {found[name]}"
    assert found["bitserve"] == str(ROOT / "server" / "__init__.py")
    assert found["bitserve.plugins"] == str(ROOT / "plugins" / "__init__.py")
    assert found["bitserve.kernels"] == str(ROOT / "kernels" / "__init__.py")


def test_import_bitserve_is_light(tmp_path):
    code = "import sys, bitserve\nprint(bitserve.__version__, 'torch' in sys.modules, 'transformers' in sys.modules)"
    version, torch_loaded, tf_loaded = _run(code, tmp_path).split()
    assert version == _project_version()
    assert torch_loaded == "False", "import bitserve imported torch"
    assert tf_loaded == "False"
    # and the lazy attributes still resolve
    assert _run("import bitserve\nprint(bitserve.SamplingParams.__name__)", tmp_path).strip() == "SamplingParams"


def _project_version():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The sdist and wheel built (PEP 517, no isolation: the venv's setuptools) from the tracked files."""
    tmp = tmp_path_factory.mktemp("build")
    src, out = tmp / "src", tmp / "dist"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    built = []
    for hook in ("build_sdist", "build_wheel"):  # one process each: setuptools loses the first file otherwise
        code = f"import sys\nfrom setuptools import build_meta as b\nprint('BUILT', b.{hook}(sys.argv[1]))"
        res = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        built.append(next(line for line in res.stdout.splitlines() if line.startswith("BUILT ")).split()[1])
    sdist, wheel = built
    return out / sdist, out / wheel


def test_wheel_holds_the_package_demo_model_and_license(built):
    import zipfile

    _, wheel = built
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {_import_name(path) for path, _ in _modules()}
    for module in modules:
        rel = module.replace(".", "/")
        assert f"{rel}.py" in names or f"{rel}/__init__.py" in names, f"{module} is not in the wheel"
    demo = {p.name for p in (ROOT / "server" / "demo" / "model").iterdir()}
    assert {n.rsplit("/", 1)[-1] for n in names if n.startswith("bitserve/demo/model/")} == demo
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "no LICENSE in the wheel"
    assert not [n for n in names if n.startswith(("tests/", "docs/", "bench-results/", "benchmarks/"))]


def test_sdist_holds_what_runs_the_tests_and_regenerates_the_stubs(built):
    import tarfile

    sdist, _ = built
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    tests = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("*.py")}
    assert tests <= names, f"tests missing from the sdist: {sorted(tests - names)}"
    assert {"LICENSE", "proto/bitserve/v1/chat.proto", "scripts/gen_proto.py", "requirements.lock"} <= names
