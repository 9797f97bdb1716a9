"""Offline chart tooling for tests/test_helm_chart.py: render with helm-python-sdk (Helm's
Go engine as a library), validate built-in kinds with kubernetes-validate, custom resources
with jsonschema against the CRDs in ../shared/k8s-crds, and lint YAML with yamllint.

Nothing here needs a helm binary, a cluster or a network.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, latest_version

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "bitserve"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
# The project's CRD copies (Prometheus operator, KEDA, KubeRay); override with $BITSERVE_K8S_CRDS.
CRD_DIR = Path(os.environ.get("BITSERVE_K8S_CRDS", ROOT.parent / "shared" / "k8s-crds"))

# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
KUBE_VERSIONS = ("1.30.0", latest_version())
CUSTOM_GROUPS = ("monitoring.coreos.com", "keda.sh", "ray.io")

RELEASE, NAMESPACE = "demo", "llm"


@dataclass
class Manifest:
    source: str  # template path, e.g. bitserve/templates/deployment.yaml
    doc: dict

    @property
    def kind(self) -> str:
        return self.doc["kind"]

    @property
    def name(self) -> str:
        return self.doc["metadata"]["name"]

    @property
    def is_custom(self) -> bool:
        return self.doc["apiVersion"].split("/")[0] in CUSTOM_GROUPS


@dataclass
class Rendered:
    manifests: list[Manifest]
    notes: str
    raw: dict[str, str]

    def of_kind(self, kind: str) -> list[dict]:
        return [m.doc for m in self.manifests if m.kind == kind]

    def one(self, kind: str) -> dict:
        docs = self.of_kind(kind)
        assert len(docs) == 1, f"expected one {kind}, got {len(docs)}"
        return docs[0]


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def load_values(path: Path) -> dict:
    return helm.values_from_yaml(path.read_text()) or {}


def render(values: dict | None = None) -> Rendered:
    raw = chart().render(values=values or {}, name=RELEASE, namespace=NAMESPACE)
    manifests, notes = [], ""
    for source, text in sorted(raw.items()):
        if source.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                manifests.append(Manifest(source, doc))
    return Rendered(manifests, notes, raw)


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def lint_problems(values: dict, kube_version: str) -> list[str]:
    """`helm lint --strict`: every warning or error (info such as 'icon is recommended' is not one)."""
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{kube_version}")
    problems = [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]
    return problems + [e for e in report["errors"] if not any(e in p for p in problems)]


# -- built-in kinds -------------------------------------------------------------------------

def validate_builtin(doc: dict, version: str) -> None:
    """kubernetes-validate --strict (unknown fields are errors) for one Kubernetes version."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except SchemaNotFoundError as e:
        raise AssertionError(f"no schema for built-in {doc['apiVersion']} {doc['kind']} in Kubernetes {version}: "
                             f"{e.message}") from None
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        raise AssertionError(f"{doc['kind']}/{doc['metadata'].get('name')} fails Kubernetes {version} at "
                             f"{path}: {e.message}") from None


def validate_metadata(metadata: dict, version: str) -> None:
    """ObjectMeta of a custom resource, strictly (CRD schemas only say `type: object`)."""
    validate_builtin({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata}, version)


def validate_pod_template(template: dict, version: str) -> None:
    """A pod template embedded in a custom resource, as the built-in v1 PodTemplate kind."""
    validate_builtin({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "embedded"},
                      "template": template}, version)


# -- custom resources -----------------------------------------------------------------------

def _strict(schema):
    """Close every object schema that lists properties (as an API server with strict field
    validation, `kubectl apply`'s default, rejects unknown fields)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _load_crd_file(path: Path) -> list[dict]:
    text = path.read_text()
    if "{{" in text:  # a CRD shipped as a Helm template (KEDA's): drop the template lines
        lines = [line for line in text.splitlines() if not line.lstrip().startswith("{{")]
        text = re.sub(r"\{\{.*?\}\}", "templated", "\n".join(lines))
    return [d for d in yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d]


@functools.cache
def crd_index() -> dict[str, Path]:
    """kind -> CRD file (by file name, so that only the needed multi-megabyte files are parsed)."""
    if not CRD_DIR.is_dir():
        raise AssertionError(f"CRD folder {CRD_DIR} is missing (set BITSERVE_K8S_CRDS to the k8s-crds copies)")
    return {p.stem: p for p in CRD_DIR.glob("*.yaml")}


@functools.cache
def crd_schema(api_version: str, kind: str) -> dict:
    """The strict openAPIV3Schema of a served CRD version."""
    group, version = api_version.split("/")
    path = crd_index().get(kind.lower() + "s")
    assert path is not None, f"no CRD file for {kind} in {CRD_DIR}"
    for crd in _load_crd_file(path):
        spec = crd["spec"]
        if spec["group"] != group or spec["names"]["kind"] != kind:
            continue
        for v in spec["versions"]:
            if v["name"] == version:
                assert v.get("served", True), f"{api_version} {kind} is not served"
                assert not v.get("deprecated"), f"{api_version} {kind} is deprecated"
                return _strict(v["schema"]["openAPIV3Schema"])
    raise AssertionError(f"{path.name} has no {api_version} {kind}")


def validate_custom(doc: dict, versions=KUBE_VERSIONS) -> None:
    schema = crd_schema(doc["apiVersion"], doc["kind"])
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        raise AssertionError(f"{doc['kind']}/{doc['metadata'].get('name')} does not match its CRD:\n" + "\n".join(
            f"  {'.'.join(map(str, e.path)) or '<root>'}: {e.message[:300]}" for e in errors[:10]))
    for version in versions:
        validate_metadata(doc["metadata"], version)
        for template in embedded_pod_templates(doc):
            validate_pod_template(template, version)


def embedded_pod_templates(doc: dict) -> list[dict]:
    if doc["kind"] == "RayCluster":
        spec = doc["spec"]
        return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
    return []


# -- pods -----------------------------------------------------------------------------------

def pod_specs(rendered: Rendered) -> list[tuple[str, dict]]:
    """(label, pod spec) of every pod the release creates, the helm test pod included."""
    out = []
    for m in rendered.manifests:
        if m.kind == "Deployment":
            out.append((f"Deployment/{m.name}", m.doc["spec"]["template"]["spec"]))
        elif m.kind == "Pod":
            out.append((f"Pod/{m.name}", m.doc["spec"]))
        else:
            for i, template in enumerate(embedded_pod_templates(m.doc)):
                out.append((f"{m.kind}/{m.name}[{'head' if i == 0 else 'worker'}]", template["spec"]))
    return out


def server_pod(rendered: Rendered) -> dict:
    """Pod spec of the pods behind the gRPC Service (Deployment, or the Ray head)."""
    deployments = rendered.of_kind("Deployment")
    if deployments:
        return deployments[0]["spec"]["template"]["spec"]
    return rendered.one("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]


def container_port(container: dict, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert name in ports, f"container {container['name']} has no port named {name}: {ports}"
    return ports[name]


def flag_values(args: list[str]) -> dict[str, str | bool]:
    """`--flag value` / `--flag` / `--no-flag` argv words -> {flag: value or True/False}."""
    out: dict[str, str | bool] = {}
    i = 0
    while i < len(args):
        word = args[i]
        assert word.startswith("--"), f"unexpected argument {word!r} in {args}"
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[word] = args[i + 1]
            i += 2
        else:
            out[word] = True
            i += 1
    return out


# -- YAML lint --------------------------------------------------------------------------------

YAMLLINT_RENDERED = """
extends: default
rules:
  document-start: disable
  empty-lines: {max: 2, max-start: 1, max-end: 1}
  line-length: disable
  comments: disable
  comments-indentation: disable
  indentation: {spaces: consistent, indent-sequences: whatever}
  truthy: {check-keys: true, allowed-values: ["true", "false"]}
"""


def yamllint_problems(text: str, config: str = YAMLLINT_RENDERED) -> list[str]:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(config)
    return [f"{p.line}:{p.column} {p.rule}: {p.desc}" for p in linter.run(text, conf) if p.level == "error"]
