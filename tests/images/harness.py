"""The images of deploy/docker, built and run for `make test-images`.

A Docker daemon is used if one answers, else started (as root, with the host's network
and firewall left alone: no bridge, no iptables). With no registry to pull from, the
Python base image is bootstrapped from Debian's archive with mmdebstrap (bookworm:
Python 3.11, pip, the machine's own extra CA certificates) and passed to the unchanged
Dockerfiles as PYTHON_IMAGE; so is a Redis image. pip's configured wheel folders (where a
machine keeps the CPU build of torch) are served over loopback for the build as
TORCH_FIND_LINKS, so no machine path is written into a Dockerfile.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
BASE_IMAGE = "esm2-base:bookworm"
REDIS_IMAGE = "esm2-redis:bookworm"
# What python:3.11-slim has and the packages need: libstdc++ for torch, openvino, grpcio.
BASE_PACKAGES = "python3,python3-pip,python-is-python3,passwd,ca-certificates,libstdc++6"
EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")
DOCKERD_FLAGS = ["--bridge=none", "--iptables=false", "--ip-forward=false", "--ip-masq=false"]
DOCKERD_LOG = "/tmp/esm2-test-dockerd.log"
DOCKERD_PIDFILE = Path("/tmp/esm2-test-dockerd.pid")
_daemon_started = False  # by this test session, so it stops it
IMAGES = {
    "frontend": "Dockerfile.frontend",
    "worker-cpu": "Dockerfile.worker-cpu",
    "worker-gpu": "Dockerfile.worker-gpu",
}


def run(*args, timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))}: {result.stderr[-3000:]}")
    return result


def daemon_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return run("docker", "info", check=False, timeout=30).returncode == 0


def ensure_daemon() -> str | None:
    """None once a daemon answers; else why none could be started. A daemon started here
    writes DOCKERD_PIDFILE, and `stop_started_daemon` stops it, and only it."""
    global _daemon_started
    if shutil.which("docker") is None:
        return "no docker client (Debian: apt-get install docker.io)"
    if daemon_answers():
        return None
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        return "no Docker daemon answers, and this user cannot start dockerd"
    # The shell detaches the daemon and owns its log, so this process holds neither
    # a child nor an open file when the tests end.
    flags = " ".join([*DOCKERD_FLAGS, f"--pidfile={DOCKERD_PIDFILE}"])
    run("sh", "-c", f"setsid dockerd {flags} >{DOCKERD_LOG} 2>&1 </dev/null &", timeout=30)
    _daemon_started = True
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if daemon_answers():
            return None
        time.sleep(1)
    return f"dockerd did not answer within 60 s (see {DOCKERD_LOG})"


def stop_started_daemon(timeout_s: float = 60) -> None:
    """Stops the daemon `ensure_daemon` started (it would stay, using CPU, after the
    tests); a daemon that was already running is left alone. Images stay on disk."""
    if not _daemon_started:
        return
    try:
        pid = int(DOCKERD_PIDFILE.read_text())
        if Path(f"/proc/{pid}/comm").read_text().strip() != "dockerd":
            return  # a stale pidfile
        os.kill(pid, signal.SIGTERM)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # dockerd removes its pidfile as it exits
        if not DOCKERD_PIDFILE.exists() or not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.5)
    raise RuntimeError(f"dockerd (pid {pid}) did not stop within {timeout_s:.0f} s")


def image_exists(tag: str) -> bool:
    return run("docker", "image", "inspect", tag, check=False).returncode == 0


def bootstrap(tag: str, packages: str, changes: list[str]) -> float:
    """A Debian bookworm image made with mmdebstrap and `docker import`; its seconds."""
    hooks = []
    # The host's extra CAs (a proxy's), for images that fetch over TLS (pip).
    if "ca-certificates" in packages and EXTRA_CA_DIR.is_dir() and any(EXTRA_CA_DIR.iterdir()):
        hooks = [
            f"--customize-hook=copy-in {EXTRA_CA_DIR} /usr/local/share",
            '--customize-hook=chroot "$1" update-ca-certificates',
        ]
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as errors:
        debootstrap = subprocess.Popen(
            ["mmdebstrap", "--variant=essential", f"--include={packages}", *hooks, "bookworm", "-"],
            stdout=subprocess.PIPE,
            stderr=errors,
        )
        importing = run(
            "docker", "import", *(f"--change={c}" for c in changes), "-", tag,
            stdin=debootstrap.stdout, timeout=900, check=False,
        )  # fmt: skip
        debootstrap.stdout.close()
        if debootstrap.wait() != 0 or importing.returncode != 0:
            errors.seek(0)
            said = errors.read()[-3000:] + importing.stderr[-2000:]
            # docker import takes a truncated tar too: never leave that image tagged.
            run("docker", "image", "rm", "--force", tag, check=False)
            raise RuntimeError(f"mmdebstrap or docker import failed for {tag}:\n{said}")
    return time.monotonic() - started


def base_images() -> dict[str, str]:
    """PYTHON_IMAGE and the Redis image: given (ESM2_PYTHON_IMAGE, ESM2_REDIS_IMAGE),
    already here, or bootstrapped now."""
    python = os.environ.get("ESM2_PYTHON_IMAGE") or BASE_IMAGE
    redis = os.environ.get("ESM2_REDIS_IMAGE") or REDIS_IMAGE
    if python == BASE_IMAGE and not image_exists(BASE_IMAGE):
        bootstrap(BASE_IMAGE, BASE_PACKAGES, ["ENV PIP_BREAK_SYSTEM_PACKAGES=1", 'CMD ["python3"]'])
    if redis == REDIS_IMAGE and not image_exists(REDIS_IMAGE):
        bootstrap(REDIS_IMAGE, "redis-server", ['CMD ["redis-server"]'])
    return {"python": python, "redis": redis}


def pip_wheel_folders() -> list[Path]:
    """The folders pip's configuration names for --find-links (PIP_FIND_LINKS included)."""
    listed = run("python3", "-m", "pip", "config", "list", check=False).stdout
    values = [os.environ.get("PIP_FIND_LINKS", "")]
    values += [
        line.split("=", 1)[1].strip("'\"") for line in listed.splitlines() if "find-links" in line
    ]
    folders = [Path(v.removeprefix("file://")) for value in values for v in value.split() if v]
    return [folder for folder in dict.fromkeys(folders) if folder.is_dir()]


@contextlib.contextmanager
def served_wheels() -> Iterator[str | None]:
    """The first configured wheel folder holding a CPU torch wheel, over loopback."""
    folder = next((f for f in pip_wheel_folders() if any(f.glob("torch-*+cpu-*.whl"))), None)
    if folder is None:
        yield None
        return
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def build(name: str, tag: str, build_args: dict[str, str]) -> float:
    """`docker build` of deploy/docker/<Dockerfile> from the repository root; its seconds."""
    args = [a for key, value in build_args.items() for a in ("--build-arg", f"{key}={value}")]
    started = time.monotonic()
    run(
        "docker", "build", "--network", "host", *args, "-f", DOCKER / IMAGES[name], "-t", tag, ROOT,
        timeout=1800,
    )  # fmt: skip
    return time.monotonic() - started


def image_size(tag: str) -> int:
    return int(run("docker", "image", "inspect", "--format", "{{.Size}}", tag).stdout)


def inspect(container: str) -> dict:
    return json.loads(run("docker", "inspect", container).stdout)[0]


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"{what} within {timeout_s:g} s")
