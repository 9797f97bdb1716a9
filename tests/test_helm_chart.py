"""The Helm chart (helm/bitserve) and the container image recipe, proven offline.

For every helm/bitserve/ci/*-values.yaml: `helm lint --strict` and rendering through Helm's
Go engine (helm-python-sdk), strict schema validation of every built-in object for the
oldest supported and the newest known Kubernetes (kubernetes-validate), custom resources
against the CRDs in ../shared/k8s-crds (jsonschema; embedded pod templates also as built-in
PodTemplates), yamllint on the rendered YAML, and assertions on what the manifests mean.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import tomllib
import typing

import helm_python as helm
import pytest

import helm_tools as ht
from helm_tools import CHART, CI_VALUES, KUBE_VERSIONS, NAMESPACE, ROOT

CHAT_SERVICE = "bitserve.v1.ChatService"
# Config fields the chart does not take as values: host (must listen on all addresses for the
# probes), model/revision (derived from `model`), TLS (Kubernetes gRPC probes cannot speak TLS),
# api_token (a Secret: apiTokenSecret).
CHART_MANAGED_FIELDS = {"host", "model", "revision", "tls_cert", "tls_key", "api_token"}

ci_files = pytest.mark.parametrize("ci", CI_VALUES, ids=lambda p: p.name.removesuffix("-values.yaml"))


@functools.cache
def rendered_ci(path) -> ht.Rendered:
    return ht.render(ht.load_values(path))


@functools.cache
def merged_ci(path) -> dict:
    return ht.chart().merge_values(ht.load_values(path))


def server_pod_labels(rendered: ht.Rendered) -> dict:
    if rendered.of_kind("Deployment"):
        return rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    return rendered.one("RayCluster")["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]


def server_container(rendered: ht.Rendered) -> dict:
    return ht.server_pod(rendered)["containers"][0]


def serve_flags(rendered: ht.Rendered) -> dict:
    return ht.flag_values(server_container(rendered)["args"])


def gpu_containers(rendered: ht.Rendered) -> list[dict]:
    """Containers that run engine replicas: the server (deployment) or the Ray workers."""
    if rendered.of_kind("Deployment"):
        return [server_container(rendered)]
    return [g["template"]["spec"]["containers"][0] for g in rendered.one("RayCluster")["spec"]["workerGroupSpecs"]]


def test_ci_values_cover_both_modes_and_all_model_sources():
    assert len(CI_VALUES) >= 4
    merged = [merged_ci(p) for p in CI_VALUES]
    assert {m["mode"] for m in merged} == {"deployment", "raycluster"}
    assert {m["model"]["source"] for m in merged} >= {"demo", "pvc", "huggingface", "image"}
    assert {m["autoscaling"]["kind"] for m in merged if m["autoscaling"]["enabled"]} == {"keda", "hpa"}


# -- lint, render, validate ---------------------------------------------------------------------

@ci_files
@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_helm_lint_strict(ci, kube):
    assert ht.lint_problems(ht.load_values(ci), kube) == []


@ci_files
def test_builtin_objects_validate_strictly(ci):
    rendered = rendered_ci(ci)
    builtin = [m.doc for m in rendered.manifests if not m.is_custom]
    assert {"Deployment", "Service", "Pod"} & {d["kind"] for d in builtin}
    for version in KUBE_VERSIONS:
        for doc in builtin:
            ht.validate_builtin(doc, version)
    names = [(m.kind, m.name) for m in rendered.manifests]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"


@ci_files
def test_custom_resources_match_their_crds(ci):
    for m in rendered_ci(ci).manifests:
        if m.is_custom:
            ht.validate_custom(m.doc)


@ci_files
def test_rendered_yaml_lints_clean(ci):
    for source, text in rendered_ci(ci).raw.items():
        if not source.endswith("NOTES.txt"):
            assert ht.yamllint_problems(text) == [], source


def test_chart_yaml_files_lint_clean():
    config = "{extends: default, rules: {line-length: {max: 120}, document-start: disable, truthy: {check-keys: false}}}"
    for path in [CHART / "Chart.yaml", CHART / "values.yaml", *CI_VALUES]:
        assert ht.yamllint_problems(path.read_text(), config) == [], path.name


def test_both_modes_render():
    deployment = ht.render({})
    assert {m.kind for m in deployment.manifests} == {"Deployment", "Service", "ServiceAccount",
                                                       "PodDisruptionBudget", "Pod"}
    ray = ht.render({"mode": "raycluster"})
    assert {m.kind for m in ray.manifests} == {"RayCluster", "Service", "ServiceAccount", "PodDisruptionBudget", "Pod"}
    for rendered in (deployment, ray):
        for m in rendered.manifests:
            if m.is_custom:
                ht.validate_custom(m.doc)
            else:
                ht.validate_builtin(m.doc, KUBE_VERSIONS[0])
        assert "helm test" in rendered.notes and "port-forward" in rendered.notes


# -- what the manifests mean --------------------------------------------------------------------

@ci_files
def test_probes_are_native_grpc_on_the_grpc_port(ci):
    rendered = rendered_ci(ci)
    container = server_container(rendered)
    port = ht.container_port(container, "grpc")
    assert port == int(serve_flags(rendered)["--port"]) == merged_ci(ci)["config"]["port"]
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"] == {"port": port, "service": CHAT_SERVICE}, probe
    assert container["livenessProbe"]["grpc"] == {"port": port, "service": ""}
    # Ready only after warm-up, and never restarted while the model loads.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert ht.container_port(container, "metrics") == int(serve_flags(rendered)["--metrics-port"])


@ci_files
def test_service_exposes_grpc_and_metrics_of_the_server_pods(ci):
    rendered = rendered_ci(ci)
    pod = ht.server_pod(rendered)
    labels = server_pod_labels(rendered)
    for service in rendered.of_kind("Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert set(ports) == {"grpc", "metrics"}
        assert ports["grpc"]["appProtocol"]
        for name, port in ports.items():
            assert port["targetPort"] == name
            assert port["port"] == ht.container_port(pod["containers"][0], name)


@ci_files
def test_gpu_limits(ci):
    rendered, values = rendered_ci(ci), merged_ci(ci)
    gpu = values["gpu"]
    for container in gpu_containers(rendered):
        limits, requests = container["resources"].get("limits", {}), container["resources"].get("requests", {})
        if gpu["count"]:
            assert limits[gpu["resource"]] == gpu["count"]
        else:
            assert gpu["resource"] not in limits and gpu["resource"] not in requests
    gpu_pods = ([ht.server_pod(rendered)] if rendered.of_kind("Deployment") else
                [g["template"]["spec"] for g in rendered.one("RayCluster")["spec"]["workerGroupSpecs"]])
    for pod in gpu_pods:
        tolerated = {t.get("key") for t in pod.get("tolerations", [])}
        assert (gpu["resource"] in tolerated) == bool(gpu["count"] and gpu["tolerateTaint"])
    if values["mode"] == "raycluster":  # the head serves gRPC on CPU
        head = server_container(rendered)
        assert not any(k.endswith("gpu") for k in head["resources"].get("limits", {}))


@ci_files
def test_drain_settings_are_consistent(ci):
    rendered = rendered_ci(ci)
    pod, container = ht.server_pod(rendered), server_container(rendered)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    grace = float(serve_flags(rendered)["--grace-period-s"])
    # preStop and the server's own drain both run inside terminationGracePeriodSeconds, and
    # the server needs a few seconds after the grace period to stop the engine.
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace + 5
    assert grace == merged_ci(ci)["config"]["grace_period_s"]
    for deployment in rendered.of_kind("Deployment"):
        rolling = deployment["spec"]["strategy"]["rollingUpdate"]
        assert rolling["maxSurge"] or rolling["maxUnavailable"]
        assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    for pdb in rendered.of_kind("PodDisruptionBudget"):
        assert "maxUnavailable" in pdb["spec"] or pdb["spec"]["minAvailable"] != 0


def test_default_rollout_keeps_full_capacity():
    rolling = ht.render({}).one("Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert rolling == {"maxSurge": 1, "maxUnavailable": 0}


@ci_files
def test_pods_are_restricted_and_read_only(ci):
    for label, pod in ht.pod_specs(rendered_ci(ci)):
        assert pod["automountServiceAccountToken"] is False, label
        assert pod["securityContext"]["runAsNonRoot"] is True, label
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, label
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"] + pod.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, label
            assert sc["capabilities"]["drop"] == ["ALL"], label
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{label}/{container['name']}: nothing writable at /tmp"
            assert "emptyDir" in volumes[mounts["/tmp"]]
        if "test" not in label:
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", label
            assert "/var/cache/bitserve" in mounts, label


@ci_files
def test_serve_args_parse_with_the_real_cli(ci):
    from bitserve import config as config_module
    from bitserve.cli import _build_parser
    from bitserve.cli_args import dataclass_from_args

    rendered, values = rendered_ci(ci), merged_ci(ci)
    args = server_container(rendered)["args"]
    namespace, unknown = _build_parser().parse_known_args(["serve", *args])
    assert not unknown, f"the chart renders flags that `bitserve serve` does not have: {unknown}"
    for cls in (config_module.ModelLoadConfig, config_module.EngineConfig, config_module.ReplicaConfig,
                config_module.ServerConfig):
        dataclass_from_args(cls, namespace)  # the dataclasses' own checks
    for key, value in values["config"].items():
        assert getattr(namespace, key) == value, key
    if values["mode"] == "raycluster":
        flags = serve_flags(rendered)
        assert flags["--ray-address"] == "auto"
        gpus = values["ray"]["worker"]["replicas"] * values["gpu"]["count"]
        assert int(flags["--replicas"]) == values["config"].get("replicas", gpus // values["config"].get(
            "gpus_per_replica", 1))


def test_config_values_render_as_flags():
    config = {"max_num_seqs": 7, "gpu_memory_utilization": 0.5, "enable_prefix_caching": False,
              "kv_pre_rope_keys": True, "kv_cache_dtype": "int4", "kv_cache_memory_mb": 3000000, "format": "bitnet"}
    args = server_container(ht.render({"config": config}))["args"]
    flags = ht.flag_values(args)
    assert flags["--max-num-seqs"] == "7" and flags["--gpu-memory-utilization"] == "0.5"
    assert flags["--kv-cache-memory-mb"] == "3000000"  # not 3e+06
    assert flags["--no-enable-prefix-caching"] is True and flags["--kv-pre-rope-keys"] is True
    assert flags["--format"] == "bitnet" and "--model" not in flags  # the bundled demo model
    # defaults that equal the CLI's; nothing else is passed
    assert set(flags) == {"--" + k.replace("_", "-") for k in config if k not in (
        "enable_prefix_caching",)} | {"--no-enable-prefix-caching", "--port", "--metrics-port", "--grace-period-s"}


def test_schema_matches_the_config_dataclasses():
    from bitserve import config as config_module

    classes = (config_module.ModelLoadConfig, config_module.EngineConfig, config_module.ReplicaConfig,
               config_module.ServerConfig)
    schema = json.loads((CHART / "values.schema.json").read_text())
    props = schema["properties"]["config"]["properties"]
    fields = {f.name: (cls, f) for cls in classes for f in dataclasses.fields(cls)}
    assert set(props) == set(fields) - CHART_MANAGED_FIELDS, (
        "every serve flag is a chart value (or listed in CHART_MANAGED_FIELDS)")
    json_type = {int: "integer", float: "number", bool: "boolean", str: "string"}
    for name, (cls, f) in fields.items():
        if name not in props:
            continue
        annotation = typing.get_type_hints(cls)[name]
        args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
        prop = props[name]
        if "$ref" in prop:
            prop = schema["definitions"][prop["$ref"].rsplit("/", 1)[-1]]
        assert prop["type"] == json_type[args[0]], name
        if f.default not in (None, dataclasses.MISSING):  # the server's default is a valid value
            ht.chart().validate_schema({"config": {name: f.default}})
    values_text = (CHART / "values.yaml").read_text()
    for name in props:  # each accepted key is shown in values.yaml (set or as a commented example)
        assert re.search(rf"^\s+(# )?{name}:", values_text, re.M), f"values.yaml does not mention config.{name}"
    choices = getattr(config_module, "KV_DTYPE_CHOICES", None)
    if choices is not None:
        assert set(props["kv_cache_dtype"]["enum"]) == set(choices)


BAD_VALUES = {
    "unknown mode": {"mode": "rayservice"},
    "negative replicaCount": {"replicaCount": -1},
    "short digest": {"image": {"digest": "sha256:abc"}},
    "zero max_num_seqs": {"config": {"max_num_seqs": 0}},
    "string max_num_seqs": {"config": {"max_num_seqs": "64"}},
    "unknown kv dtype": {"config": {"kv_cache_dtype": "int3"}},
    "typo in a flag": {"config": {"max_num_seq": 64}},
    "token as a value": {"config": {"api_token": "hunter2"}},
    "host is chart-managed": {"config": {"host": "127.0.0.1"}},
    "utilization above 1": {"config": {"gpu_memory_utilization": 1.5}},
    "port out of range": {"config": {"port": 70000}},
    "huggingface without repo": {"model": {"source": "huggingface"}},
    "pvc without claim": {"model": {"source": "pvc", "path": "x"}},
    "relative image path": {"model": {"source": "image", "path": "models/x"}},
    "negative gpu count": {"gpu": {"count": -1}},
    "memory in GB": {"resources": {"limits": {"memory": "16GB"}}},
    "autoscaling a raycluster": {"mode": "raycluster", "autoscaling": {"enabled": True}},
    "unknown autoscaler": {"autoscaling": {"kind": "vpa"}},
    "numeric rayStartParams": {"ray": {"worker": {"rayStartParams": {"num-gpus": 1}}}},
    "zero probe period": {"probes": {"liveness": {"periodSeconds": 0}}},
    "bad scrape interval": {"metrics": {"serviceMonitor": {"interval": "15 seconds"}}},
    "unknown top-level key": {"replicas": 2},
    "two scrapers": {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}},
    "raycluster without GPUs": {"mode": "raycluster", "gpu": {"count": 0}},
}


@pytest.mark.parametrize("values", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_rejects_bad_values(values):
    with pytest.raises(helm.HelmValuesError):
        ht.chart().validate_schema(values)
    assert ht.lint_problems(values, KUBE_VERSIONS[0]), "helm lint must fail too"


# Arithmetic across values that JSON schema cannot state: `fail` in the templates stops
# `helm install` / `helm template` (Helm's lint mode only logs `fail`, so lint cannot see these).
BAD_COMBINATIONS = {
    "more replicas than GPUs": ({"gpu": {"count": 2}, "config": {"replicas": 4}}, "more GPUs"),
    "more ray replicas than GPUs": ({"mode": "raycluster", "gpu": {"count": 4}, "ray": {"worker": {"replicas": 2}},
                                     "config": {"replicas": 9}}, "more GPUs"),
    "min above max": ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "minReplicas"),
    # KEDA's query and the alerts select job=<fullname>, which only the chart's monitors set
    "keda without a monitor": ({"autoscaling": {"enabled": True, "kind": "keda"}}, "enable one"),
    "alerts without a monitor": ({"metrics": {"prometheusRule": {"enabled": True}}}, "enable one"),
    "raycluster replicas from 0 GPUs each": ({"mode": "raycluster", "gpu": {"count": 1},
                                             "config": {"gpus_per_replica": 0}}, "set config.replicas"),
    "too few Ray CPUs on the workers": ({"mode": "raycluster", "gpu": {"count": 8},
                                         "ray": {"worker": {"rayStartParams": {"num-cpus": "4"}}}}, "Ray CPUs"),
}


@pytest.mark.parametrize("values,message", BAD_COMBINATIONS.values(), ids=BAD_COMBINATIONS.keys())
def test_inconsistent_values_fail_to_render(values, message):
    ht.chart().validate_schema(values)
    with pytest.raises(helm.HelmRenderError, match=message):
        ht.render(values)


# -- model sources, image -------------------------------------------------------------------------

def test_model_sources():
    demo = ht.render({})
    assert "--model" not in serve_flags(demo)
    assert "model" not in {v["name"] for v in ht.server_pod(demo)["volumes"]}

    pvc = ht.render({"model": {"source": "pvc", "path": "/ckpt/bitnet", "pvc": {"claimName": "weights"}}})
    pod = ht.server_pod(pvc)
    assert serve_flags(pvc)["--model"] == "/models/ckpt/bitnet"
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in pod["volumes"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in pod["containers"][0]["volumeMounts"]

    hf = ht.render({"model": {"source": "huggingface", "huggingface": {
        "repo": "org/model-1.58b", "revision": "abc123", "tokenSecret": {"name": "hf"}}}})
    pod = ht.server_pod(hf)
    (init,) = pod["initContainers"]
    env = {e["name"]: e for e in init["env"]}
    assert serve_flags(hf)["--model"] == env["BITSERVE_MODEL_DIR"]["value"] == "/models/hf/abc123/org/model-1.58b"
    assert env["BITSERVE_HF_REPO"]["value"] == "org/model-1.58b" and env["BITSERVE_HF_REVISION"]["value"] == "abc123"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "HF_TOKEN"}
    assert "snapshot_download" in init["command"][-1]
    assert {"name": "model", "mountPath": "/models"} in init["volumeMounts"]  # writable for the download
    assert {"name": "model", "emptyDir": {"sizeLimit": "20Gi"}} in pod["volumes"]

    image = ht.render({"model": {"source": "image", "path": "/opt/weights/m"}})
    assert serve_flags(image)["--model"] == "/opt/weights/m"


def test_raycluster_head_starts_ray_then_serves():
    rendered = ht.render({"mode": "raycluster", "gpu": {"count": 2}, "ray": {"worker": {"replicas": 3}}})
    cluster = rendered.one("RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]
    assert head["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    script = head["spec"]["containers"][0]["command"]
    assert "KUBERAY_GEN_RAY_START_CMD" in script[-2] and "exec bitserve serve" in script[-2]
    flags = ht.flag_values(head["spec"]["containers"][0]["args"])
    assert flags["--ray-address"] == "auto" and flags["--replicas"] == "6"
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    worker = group["template"]["spec"]["containers"][0]
    assert "command" not in worker and "args" not in worker  # KubeRay's own `ray start`
    port = int(group["rayStartParams"]["node-manager-port"])
    assert worker["livenessProbe"]["tcpSocket"]["port"] == "raylet" and ht.container_port(worker, "raylet") == port
    lock = (ROOT / "requirements.lock").read_text()
    assert f"ray=={cluster['spec']['rayVersion']}" in lock.split()
    pdb = rendered.one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "ray-worker"


def test_image_reference():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert ht.chart().metadata["appVersion"] == version
    assert server_container(ht.render({}))["image"] == f"bitserve:{version}"
    digest = "sha256:" + "ab" * 32
    pinned = ht.render({"image": {"repository": "r.example/bitserve", "tag": "x", "digest": digest}})
    assert all(c["image"] == f"r.example/bitserve@{digest}"
               for _, pod in ht.pod_specs(pinned) for c in pod["containers"])


def test_helm_test_pod_checks_grpc_health_through_the_service():
    rendered = ht.render({"config": {"port": 6000}})
    (pod,) = rendered.of_kind("Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    container = pod["spec"]["containers"][0]
    assert "grpc_health" in container["command"][-1] and CHAT_SERVICE in container["command"][-1]
    env = {e["name"]: e["value"] for e in container["env"]}
    service = rendered.one("Service")["metadata"]["name"]
    assert env["BITSERVE_ADDRESS"] == f"{service}.{NAMESPACE}.svc:6000"


def test_autoscaling_targets_the_deployment():
    for kind, object_kind in (("keda", "ScaledObject"), ("hpa", "HorizontalPodAutoscaler")):
        rendered = ht.render({"autoscaling": {"enabled": True, "kind": kind},
                              "metrics": {"podMonitor": {"enabled": True}}})
        deployment = rendered.one("Deployment")
        assert "replicas" not in deployment["spec"]  # owned by the autoscaler
        scaler = rendered.one(object_kind)
        assert scaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert "bitserve_num_requests_waiting" in json.dumps(scaler)
        if kind == "keda":  # plus the requests waiting for a ready replica (the HPA's Pods metric cannot add them)
            assert "bitserve_requests_awaiting_replica" in json.dumps(scaler)


# -- monitoring ------------------------------------------------------------------------------------

@functools.cache
def exported_samples() -> frozenset[str]:
    """Sample names the server's /metrics really exposes."""
    from prometheus_client.parser import text_string_to_metric_families

    from bitserve.engine.core import EngineStats
    from bitserve.frontend import ModelInfo
    from bitserve.metrics import Metrics

    hints = typing.get_type_hints(ModelInfo)
    dummy = {int: 1, float: 1.0, str: "x"}
    info = ModelInfo(**{f.name: dummy.get(hints[f.name], "x") for f in dataclasses.fields(ModelInfo)})
    metrics = Metrics(info, EngineStats)
    metrics.observe_rpc_started("/bitserve.v1.ChatService/Chat")
    metrics.observe_rpc("/bitserve.v1.ChatService/Chat", "OK", 0.1)
    return frozenset(s.name for fam in text_string_to_metric_families(metrics.render().decode()) for s in fam.samples)


def promql_expressions(rendered: ht.Rendered) -> dict[str, str]:
    exprs = {}
    for rule in rendered.of_kind("PrometheusRule"):
        for group in rule["spec"]["groups"]:
            exprs.update({r["alert"]: r["expr"] for r in group["rules"]})
    for cm in rendered.of_kind("ConfigMap"):
        dashboard = json.loads(cm["data"]["bitserve.json"])
        for panel in dashboard["panels"]:
            exprs.update({f"panel {panel['title']}/{t['refId']}": t["expr"] for t in panel["targets"]})
    for scaler in rendered.of_kind("ScaledObject"):
        exprs.update({f"keda {i}": t["metadata"]["query"] for i, t in enumerate(scaler["spec"]["triggers"])})
    return exprs


def test_alerts_and_dashboard_use_exported_metrics():
    rendered = ht.render({"autoscaling": {"enabled": True}, "metrics": {
        "serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True}}})
    exprs = promql_expressions(rendered)
    exported = exported_samples()
    used = set()
    for where, expr in exprs.items():
        for opening, closing in ("()", "{}", "[]"):
            assert expr.count(opening) == expr.count(closing), f"{where}: unbalanced {opening}{closing}: {expr}"
        names = set(re.findall(r"\bbitserve_[a-z0-9_]+", expr))
        assert names or "up{" in expr, where
        assert names <= exported, f"{where} uses metrics the server does not export: {names - exported}"
        used |= names
    alerts = {k: v for k, v in exprs.items() if not k.startswith(("panel", "keda"))}
    assert "bitserve_time_to_first_token_seconds_bucket" in alerts["BitserveSlowTimeToFirstToken"]
    assert "bitserve_grpc_server_handled_total" in alerts["BitserveHighErrorRate"]
    # per pod, summed over its engine replicas (a pod with several has one series per replica label)
    # (requests waiting for a ready replica included: they are queued work the engines cannot see yet)
    waiting = r'\{__name__=~"bitserve_num_requests_waiting\|bitserve_requests_awaiting_replica", *[^}]*\}'
    assert re.match(rf"max\(sum by \(pod\) \({waiting}\)\) > \d+$", alerts["BitserveQueueBacklog"]), \
        alerts["BitserveQueueBacklog"]
    assert used >= {"bitserve_time_to_first_token_seconds_bucket", "bitserve_inter_token_latency_seconds_bucket",
                    "bitserve_num_requests_waiting", "bitserve_num_requests_running", "bitserve_kv_cache_usage_perc",
                    "bitserve_generation_tokens_total", "bitserve_request_success_total",
                    "bitserve_model_bits_per_weight"}
    # Every series selector is scoped to this release's scrape job.
    job = rendered.one("ServiceMonitor")["spec"]["endpoints"][0]["relabelings"][0]["replacement"]
    for where, expr in exprs.items():
        if not where.startswith("panel"):
            assert f'job="{job}"' in expr and f'namespace="{NAMESPACE}"' in expr, where


def test_monitors_scrape_the_metrics_port_of_server_pods():
    for mode in ("deployment", "raycluster"):
        for monitor, endpoints in (("serviceMonitor", "endpoints"), ("podMonitor", "podMetricsEndpoints")):
            rendered = ht.render({"mode": mode, "metrics": {monitor: {"enabled": True}}})
            (obj,) = [m.doc for m in rendered.manifests if m.kind.lower() == monitor.lower()]
            (endpoint,) = obj["spec"][endpoints]
            assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
            selector = obj["spec"]["selector"]["matchLabels"]
            target = (rendered.one("Service")["metadata"]["labels"] if monitor == "serviceMonitor"
                      else server_pod_labels(rendered))
            assert selector.items() <= target.items(), (mode, monitor)


# -- container image ---------------------------------------------------------------------------------

def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_runs_bitserve_serve_as_the_charts_user():
    text = _dockerfile()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert int(uid) == ht.chart().values["podSecurityContext"]["runAsUser"]
    entrypoint = json.loads(re.findall(r"^ENTRYPOINT\s+(\[.*\])", text, re.M)[-1])
    assert entrypoint[-2:] == ["bitserve", "serve"]
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", text, re.M).group(1)
    assert "cuda" in base and "runtime" in base and not base.endswith(":latest")
    # Everything the process writes lives under paths the chart mounts as emptyDirs.
    env = dict(re.findall(r"\b(HOME|XDG_CACHE_HOME|HF_HOME|TRITON_CACHE_DIR|TORCHINDUCTOR_CACHE_DIR)=(\S+)", text))
    mounts = {m["mountPath"] for m in server_container(ht.render({}))["volumeMounts"]}
    assert len(env) == 5 and all(any(v == m or v.startswith(m + "/") for m in mounts) for v in env.values()), env


def test_image_build_context_and_pins():
    text = _dockerfile()
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(setuptools["tool"]["setuptools"]["package-dir"].values())
    ignore = (ROOT / ".dockerignore").read_text().split()
    for folder in folders:
        assert f"!{folder}/" in ignore, f".dockerignore must let {folder}/ into the build context"
        assert re.search(rf"^COPY {folder} \./{folder}$", text, re.M), f"Dockerfile must COPY {folder}"
    assert "!requirements.lock" in ignore and "!pyproject.toml" in ignore
    # The image installs the lock file minus the dev/test tools named in its grep filter.
    pattern = re.search(r"grep -v -E '([^']+)'", text).group(1)
    lock = [line.strip() for line in (ROOT / "requirements.lock").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    kept = [line for line in lock if not re.match(pattern, line)]
    dropped = {re.split(r"[=<>~! ]", line)[0] for line in lock} - {re.split(r"[=<>~! ]", line)[0] for line in kept}
    named = set(re.match(r"\^\(([^)]+)\)", pattern).group(1).split("|"))
    assert named == dropped, f"filter names packages not in the lock: {named - dropped}"
    kept_names = {re.split(r"[=<>~! ]", line)[0].lower() for line in kept}
    runtime = {re.split(r"[=<>~! \[]", d)[0].lower() for d in setuptools["project"]["dependencies"]}
    assert runtime | {"torch", "triton", "ray", "huggingface-hub", "grpcio-health-checking"} <= kept_names
    assert all("==" in line for line in kept), "the image installs exact pins only"
    assert "pytest" not in kept_names and "transformers" not in kept_names


def test_chart_docs_exist():
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for topic in ("nvidia.com/gpu", "KubeRay", "ServiceMonitor", "helm upgrade", "grace_period_s", "replicaCount"):
        assert topic in doc, topic
    assert "helm/bitserve" in doc


def test_pod_templates_survive_a_chart_version_bump():
    """Pod templates carry no chart/app version labels: upgrading the chart alone must not roll
    the Deployment or recreate the RayCluster."""
    for values in ({}, {"mode": "raycluster"}):
        rendered = ht.render(values)
        templates = [m.doc["spec"]["template"] for m in rendered.manifests if m.kind == "Deployment"]
        for cluster in rendered.of_kind("RayCluster"):
            templates += ht.embedded_pod_templates(cluster)
        assert templates
        for template in templates:
            labels = template["metadata"]["labels"]
            assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels


def test_values_of_zero_are_not_defaults():
    """0 is a value, not "unset": maxUnavailable 0 blocks evictions, grace 0 shortens the pod's
    grace period, gpus_per_replica 0 needs no GPU."""
    pdb = ht.render({"podDisruptionBudget": {"maxUnavailable": 0}}).one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 0
    values = ht.chart().values
    pod = ht.render({"config": {"grace_period_s": 0}}).one("Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == values["drain"]["preStopSleepSeconds"] + values["drain"]["shutdownSeconds"]
    args = ht.render({"gpu": {"count": 1}, "config": {"replicas": 2, "gpus_per_replica": 0}}).one("Deployment")[
        "spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--gpus-per-replica") + 1] == "0"


def test_mig_resources_also_tolerate_the_gpu_taint():
    pod = ht.render({"gpu": {"resource": "nvidia.com/mig-3g.40gb"}}).one("Deployment")["spec"]["template"]["spec"]
    keys = {t["key"] for t in pod["tolerations"]}
    assert keys == {"nvidia.com/mig-3g.40gb", "nvidia.com/gpu"}
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/mig-3g.40gb"] == 1


def test_ray_workers_advertise_cpus_for_every_replica():
    """8 replicas x 1 CPU must fit the Ray CPUs of the workers (default: their CPU request, 4),
    or the head waits for them forever: the chart sets num-cpus unless the values do."""
    cluster = ht.render({"mode": "raycluster", "gpu": {"count": 8}}).one("RayCluster")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert group["rayStartParams"]["num-cpus"] == "8"
    cluster = ht.render({"mode": "raycluster", "gpu": {"count": 4},
                         "config": {"cpus_per_replica": 0.5}}).one("RayCluster")
    assert cluster["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] == "2"
    cluster = ht.render({"mode": "raycluster", "gpu": {"count": 2},
                         "ray": {"worker": {"rayStartParams": {"num-cpus": "16"}}}}).one("RayCluster")
    assert cluster["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] == "16"
