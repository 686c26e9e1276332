"""The images, run for real: Redis, the frontend, the HTTP door and two CPU workers as
containers, deployed with deploy/compose.yaml (host networking: deploy/compose.hostnet.yaml)
and checked from the host with the Python client."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import ROOT, inspect, run, wait_until
from support import assert_close, fair_esm_outputs, read_fasta_records

from esm2_service.client import Esm2Client
from esm2_service.server.embedded_redis import free_port

PROJECT = "esm2-images-test"
COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"
TOKEN = "images-test-token"
NON_ROOT = "10001:10001"
FRONTEND_GRACE_S = 45  # terminationGracePeriodSeconds of deploy/k8s/base/frontend-deployment.yaml
ALL = ["mean", "per_token", "bos", "contacts", "logits", "attentions"]


def on_host_network(compose: dict) -> dict:
    """deploy/compose.yaml with every service on the host's network (these machines run
    Docker without bridge networking) on loopback: no published ports, the rest as is."""
    for name, service in compose["services"].items():
        service.pop("ports", None)
        service["network_mode"] = "host"
        if name in ("frontend", "http"):
            service["environment"] |= {"ESM2_HOST": "127.0.0.1", "ESM2_METRICS_HOST": "127.0.0.1"}
    compose["services"]["redis"]["command"][1:1] = ["--bind", "127.0.0.1"]
    return compose


class Deployment:
    def __init__(self, images: dict[str, str], models, tokens, folder):
        self.file = folder / "compose.yaml"
        self.file.write_text(
            yaml.safe_dump(on_host_network(yaml.safe_load(COMPOSE_FILE.read_text())))
        )
        self.ports = {name: free_port() for name in ("redis", "grpc", "http", "metrics")}
        self.target = f"127.0.0.1:{self.ports['grpc']}"
        self.env = {
            **os.environ,
            "FRONTEND_IMAGE": images["frontend"],
            "WORKER_IMAGE": images["worker-cpu"],
            "REDIS_IMAGE": images["redis"],
            "REDIS_HOST": "127.0.0.1",
            "REDIS_PORT": str(self.ports["redis"]),
            "ESM2_PORT": str(self.ports["grpc"]),
            "ESM2_HTTP_PORT": str(self.ports["http"]),
            "ESM2_METRICS_PORT": str(self.ports["metrics"]),
            "MODELS_DIR": str(models),
            "TOKENS_FILE": str(tokens),
            "WORKER_THREADS": "1",
            "ESM2_CLAIM_IDLE_S": "5",
        }

    def compose(self, *args, timeout: float = 300) -> subprocess.CompletedProcess:
        return run(
            "docker-compose", "-p", PROJECT, "-f", self.file, "--project-directory",
            COMPOSE_FILE.parent, *args, env=self.env, timeout=timeout,
        )  # fmt: skip

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).stdout.split()

    def health(self) -> int:
        with grpc.insecure_channel(self.target) as channel:
            try:
                return (
                    health_pb2_grpc.HealthStub(channel)
                    .Check(health_pb2.HealthCheckRequest(service="esm2.v1.Esm2Service"), timeout=2)
                    .status
                )
            except grpc.RpcError:
                return -1

    def wait_serving(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        wait_until(lambda: self.health() == serving, 180, "the frontend never reported SERVING")

    def http_ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.ports['http']}/readyz"
            return requests.get(url, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def wait_ready(self) -> None:
        """Both doors take requests: gRPC health SERVING and the HTTP door's /readyz."""
        serving = health_pb2.HealthCheckResponse.SERVING
        wait_until(lambda: self.health() == serving, 180, "the frontend never reported SERVING")
        wait_until(self.http_ready, 60, "the HTTP door never reported ready")

    def wait_healthy(self, container: str) -> None:
        wait_until(
            lambda: inspect(container)["State"].get("Health", {}).get("Status") == "healthy",
            240,
            f"container {container} never reported healthy",
        )

    def client(self) -> Esm2Client:
        return Esm2Client(self.target, token=TOKEN, timeout_s=300, max_concurrency=6)


@pytest.fixture(scope="module")
def deployment(images, tmp_path_factory, full_checkpoint):
    if shutil.which("docker-compose") is None:
        pytest.skip("no docker-compose (Debian: apt-get install docker-compose)")
    models = tmp_path_factory.mktemp("models")
    for path in full_checkpoint.parent.iterdir():  # the checkpoint and its regression file
        shutil.copy(path, models / path.name)
    for path in [models, *models.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # the images run as uid 10001
    tokens = tmp_path_factory.mktemp("secrets") / "tokens.txt"
    tokens.write_text(f"{TOKEN}\n")
    tokens.chmod(0o644)
    deployed = Deployment(images, models, tokens, tmp_path_factory.mktemp("compose"))
    deployed.env["CHECKPOINT"] = full_checkpoint.name
    try:
        deployed.compose("up", "-d", "--no-build", "--scale", "worker=2", timeout=600)
        deployed.wait_ready()
        yield deployed
    finally:
        logs = deployed.compose("logs", "--no-color", "--tail", "40", timeout=60)
        print(logs.stdout[-8000:])
        deployed.compose("down", "-v", "--timeout", "30", timeout=300)


@pytest.fixture(scope="module")
def reference(full_checkpoint):
    from esm2_service.worker.checkpoint import build_fair_esm_model, load_checkpoint

    return build_fair_esm_model(load_checkpoint(full_checkpoint))


def proteins(count: int, length: int) -> list[str]:
    text = "".join(sequence for _, sequence in read_fasta_records("some_proteins.fasta"))
    return [text[i * 37 : i * 37 + length] for i in range(count)]


def test_every_output_kind_through_the_containers_equals_fair_esm(deployment, reference):
    sequences = [sequence for _, sequence in read_fasta_records("few_proteins.fasta")][:2]
    with deployment.client() as client:
        results = client.encode(sequences, include=ALL, repr_layers=[0, 3, -1])
        (predicted,) = client.predict(["MKTAYIAK<mask>RQISFVK"])
        scored = client.score(sequences[0][:60], ["M1A"], strategies=["wt_marginal"])

    for sequence, result in zip(sequences, results, strict=True):
        expected = fair_esm_outputs(reference, sequence, layers=(0, 3, 6))
        for layer in (0, 3, 6):
            assert_close(result.embeddings[layer], expected["mean"][layer], what="mean")
            assert_close(result.per_token[layer], expected["per_token"][layer], what="per_token")
            assert_close(result.bos[layer], expected["bos"][layer], what="bos")
        assert_close(result.contacts, expected["contacts"], what="contacts")
        assert_close(result.logits, expected["logits"], what="logits")
        assert_close(result.attentions, expected["attentions"], what="attentions")
        assert result.model.random_weights
    masked = fair_esm_outputs(reference, "MKTAYIAK<mask>RQISFVK")["mask_logits"]
    assert_close(predicted.logits, masked, what="predict")
    logits = fair_esm_outputs(reference, sequences[0][:60])["logits"][0].astype(np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    expected = log_probs[5] - log_probs[20]  # "A" minus "M" (vocabulary columns)
    assert scored.scores["wt_marginal"][0] == pytest.approx(expected, abs=1e-4)


def test_tokens_come_from_the_secret_and_both_doors_answer(deployment):
    with (
        Esm2Client(deployment.target, timeout_s=30) as anonymous,
        pytest.raises(grpc.RpcError) as refused,
    ):
        anonymous.encode(["MKTAYIAK"])
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # CI once got 503 "no live worker" here, cause unknown: a failure now prints the logs.
    deployment.wait_ready()
    answer = requests.post(
        f"http://127.0.0.1:{deployment.ports['http']}/api/v3/esm2-8m/encode/",
        json={"items": [{"sequence": "MKTAYIAK"}]},
        headers={"Authorization": f"Token {TOKEN}"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["results"]) == 1


def test_containers_report_healthy_and_the_images_run_as_non_root(deployment, images):
    services = ["redis", "frontend", "http", "worker"]
    containers = {service: deployment.containers(service) for service in services}
    assert len(containers["worker"]) == 2
    for service, ids in containers.items():
        for container in ids:
            deployment.wait_healthy(container)
            if service != "redis":
                assert inspect(container)["Config"]["User"] == NON_ROOT
                assert run("docker", "exec", container, "id", "-u").stdout.strip() == "10001"
    for name in ("frontend", "worker-cpu", "worker-gpu"):
        if name in images:
            assert inspect(images[name])["Config"]["User"] == NON_ROOT


def test_the_frontend_image_has_no_torch(images):
    result = run(
        "docker", "run", "--rm", "--network", "none", "--entrypoint", "python",
        images["frontend"], "-c", "import torch", check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "No module named 'torch'" in result.stderr


def test_stopping_the_frontend_drains_its_streams_within_the_grace_period(deployment):
    (frontend,) = deployment.containers("frontend")
    sequences = proteins(16, 1500)
    outcome: dict = {}

    def long_request() -> None:
        with deployment.client() as client:
            outcome["results"] = client.encode(sequences, include=["per_token"])

    request = threading.Thread(target=long_request)
    request.start()
    time.sleep(1.0)  # the request is queued and streaming
    started = time.monotonic()
    run("docker", "stop", "--time", FRONTEND_GRACE_S, frontend, timeout=120)
    stopped_s = time.monotonic() - started
    request.join(timeout=120)
    assert inspect(frontend)["State"]["ExitCode"] == 0  # it exited on its own, not killed
    assert stopped_s < FRONTEND_GRACE_S
    assert len(outcome["results"]) == len(sequences)
    assert all(r.per_token[6].shape == (1500, 320) for r in outcome["results"])
    run("docker", "start", frontend)
    deployment.wait_serving()


@pytest.mark.parametrize("action", ["stop", "kill"])
def test_a_worker_stopped_or_killed_under_load_loses_nothing(deployment, reference, action):
    first, second = deployment.containers("worker")
    sequences = proteins(40, 700)
    with deployment.client() as client, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.encode, sequences)
        time.sleep(3.0)  # both workers busy
        run("docker", action, first, timeout=180)
        results = pending.result(timeout=600)
    assert [r.sequence_index for r in results] == list(range(len(sequences)))
    for index in (0, 17, 39):
        expected = fair_esm_outputs(reference, sequences[index], layers=(6,))["mean"][6]
        assert_close(results[index].embeddings[6], expected)
    run("docker", "start", first)
    deployment.wait_healthy(first)
    deployment.wait_healthy(second)
