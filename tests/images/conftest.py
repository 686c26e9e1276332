"""Fixtures of `make test-images`: the images built once, and a Compose deployment of them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from harness import (
    base_images,
    build,
    ensure_daemon,
    image_size,
    served_wheels,
    stop_started_daemon,
)

TAG = "test"
BUILT: dict[str, dict] = {}  # image -> {"tag", "seconds", "bytes"}, for the summary


@pytest.fixture(scope="session")
def images() -> Iterator[dict[str, str]]:
    """image name -> tag of the three images, built from the repository's Dockerfiles.
    A Docker daemon the tests started is stopped when they end."""
    reason = ensure_daemon()
    if reason is not None:
        pytest.skip(f"no Docker: {reason}")
    bases = base_images()
    build_args = {"PYTHON_IMAGE": bases["python"]}
    with served_wheels() as wheels:
        torch_args = {}
        if wheels is not None:  # this machine's CPU torch wheel, pip's index for the rest
            torch_args = {"TORCH_FIND_LINKS": wheels, "TORCH_INDEX_URL": "https://pypi.org/simple"}
        names = ["frontend", "worker-cpu"]
        if os.environ.get("ESM2_SKIP_GPU_IMAGE") != "1":
            names.append("worker-gpu")
        for name in names:
            tag = f"esm2-{name}:{TAG}"
            extra = torch_args if name == "worker-cpu" else {}
            seconds = build(name, tag, {**build_args, **extra})
            BUILT[name] = {"tag": tag, "seconds": seconds, "bytes": image_size(tag)}
    try:
        yield {name: info["tag"] for name, info in BUILT.items()} | {"redis": bases["redis"]}
    finally:
        stop_started_daemon()


def pytest_terminal_summary(terminalreporter) -> None:
    if not BUILT:
        return
    terminalreporter.section("images built")
    for info in BUILT.values():
        terminalreporter.write_line(
            f"{info['tag']:28} built in {info['seconds']:6.1f} s, {info['bytes'] / 1e9:5.2f} GB"
        )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """A failed test against the deployment shows its containers' latest logs."""
    report = yield
    deployment = getattr(item, "funcargs", {}).get("deployment")
    if report.failed and deployment is not None:
        logs = deployment.compose("logs", "--no-color", "--timestamps", "--tail", "60", timeout=60)
        report.sections.append(("compose logs", logs.stdout[-16000:]))
    return report
