"""`python -m bench.plumbing`: the service's path at GPU rates, with a model that costs nothing.

Real processes: an embedded Redis, N gRPC frontends sharing one port, instant workers
(`bench.instant_worker`: the real queue loop, zeros for outputs) and client processes
that keep K Encode requests of 8 in flight each for a fixed time through the Python
client (decoding included). Prints items/s, residues/s, tensor MB/s, CPU ms per item
of each kind of process, outcomes by status code, and the most Redis connections one
frontend held (sampled from CLIENT LIST), for mean-only and per-token outputs, one and
several frontends, and a sweep of requests in flight.

`--against REV` runs every cell on the code of git revision REV too, in the same run,
and prints the ratios (the bench's own code stays this tree's).

    python -m bench.plumbing                       # the full table, ~5 minutes
    python -m bench.plumbing --against main~3      # side by side with an older tree
    python -m bench.plumbing --small               # a quick dry run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import redis

from bench.procfs import cpu_seconds, status_bytes

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# The package layout of pyproject's package-dir, for running another revision's tree.
PACKAGE_DIRS = {
    "": "protos",
    "client": "client",
    "server": "server",
    "worker": "worker",
}
SEQUENCE_ALPHABET = "ACDEFGHIKLMNPQRSTVWY"
START_TIMEOUT_S = 60.0
WORKER_START_TIMEOUT_S = 300.0  # a real worker loads torch and the model, and warms up
FLOOR = "gRPC floor"


@dataclass(frozen=True)
class Cell:
    outputs: str  # "mean" or "per_token" (last layer)
    frontends: int
    in_flight: int  # requests in flight, over all clients


@dataclass
class Reading:
    cell: Cell
    tree: str
    seconds: float
    items: int
    residues: int
    tensor_bytes: int
    outcomes: dict[str, int]
    details: dict[str, str]  # an error message of each code other than OK
    cpu_s: dict[str, float]  # by kind of process
    max_frontend_connections: int
    frontend_peak_rss_mb: float  # the largest of the frontends' peak resident memory
    redis_transport: str = "tcp"  # how the service's processes reached Redis: tcp, unix

    @property
    def cpu_ms_per_item(self) -> dict[str, float]:
        return {kind: 1000 * s / max(self.items, 1) for kind, s in self.cpu_s.items()}


def sequences(residues: int, count: int = 8, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return ["".join(rng.choices(SEQUENCE_ALPHABET, k=residues)) for _ in range(count)]


# ---- the client process ----------------------------------------------------------------


async def _client_loop(target: str, in_flight: int, seconds: float, include: str, residues: int):
    import asyncio

    import grpc

    from esm2_service.client import AsyncEsm2Client

    outcomes: Counter[str] = Counter()
    details: dict[str, str] = {}  # the first error message of each code
    totals = {"items": 0, "residues": 0, "tensor_bytes": 0}
    batch = sequences(residues)
    async with AsyncEsm2Client(target, max_concurrency=in_flight, timeout_s=120) as client:
        await client.status()  # connected before the clock starts
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        stop_at = time.monotonic() + seconds

        async def one_caller():
            while time.monotonic() < stop_at:
                try:
                    results = await client.encode(batch, include=[include])
                except grpc.aio.AioRpcError as error:
                    outcomes[error.code().name] += 1
                    details.setdefault(error.code().name, error.details() or "")
                    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        await asyncio.sleep(0.05)
                    continue
                outcomes["OK"] += 1
                totals["items"] += len(results)
                totals["residues"] += sum(len(s) for s in batch)
                totals["tensor_bytes"] += sum(
                    array.nbytes for result in results for array in _arrays(result)
                )

        await asyncio.gather(*(one_caller() for _ in range(in_flight)))
    return {**totals, "outcomes": dict(outcomes), "details": details}


def _latency_loop(target: str, calls: int) -> dict:
    """One 100-residue Encode at a time: ms per call (the instant worker's model costs
    nothing, so this is what the path adds to the runner)."""
    from esm2_service.client import Esm2Client

    (sequence,) = sequences(100, count=1, seed=1)
    with Esm2Client(target, timeout_s=60) as client:
        for _ in range(20):  # warm: connections, caches
            client.encode([sequence])
        print("ready", flush=True)
        sys.stdin.readline()
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            client.encode([sequence])
            times.append(1000 * (time.perf_counter() - started))
    times.sort()
    return {"median_ms": times[len(times) // 2], "p90_ms": times[int(len(times) * 0.9)]}


def _arrays(result):
    for value in vars(result).values():
        if isinstance(value, dict):
            yield from (v for v in value.values() if hasattr(v, "nbytes"))
        elif hasattr(value, "nbytes"):
            yield value


def client_main(args: argparse.Namespace) -> int:
    import asyncio

    if args.timed_calls:
        print(json.dumps(_latency_loop(args.client, args.timed_calls)), flush=True)
        return 0
    report = asyncio.run(
        _client_loop(args.client, args.in_flight, args.seconds, args.include, args.residues)
    )
    print(json.dumps(report), flush=True)
    return 0


# ---- the service's processes -----------------------------------------------------------


def tree_pythonpath(revision: str, workdir: Path) -> str:
    """A PYTHONPATH on which `esm2_service` is git revision `revision`'s code."""
    tree = workdir / "tree"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    package = workdir / "site" / "esm2_service"
    package.parent.mkdir()
    package.symlink_to(tree / PACKAGE_DIRS[""])
    for name, folder in PACKAGE_DIRS.items():
        if name:
            (tree / PACKAGE_DIRS[""] / name).symlink_to(tree / folder)
    if "hiredis" not in (tree / "pyproject.toml").read_text():
        # That tree parsed Redis replies in Python: hide the C parser from redis-py.
        (package.parent / "hiredis").mkdir()
        (package.parent / "hiredis" / "__init__.py").write_text("raise ImportError\n")
    return f"{package.parent}{os.pathsep}{ROOT}"


def _serves_redis_on_a_unix_socket(pythonpath: str | None) -> bool:
    """Whether the tree on `pythonpath` (None: this one) has `esm2 serve` reach its
    embedded Redis over a Unix socket."""
    if pythonpath is None:
        return True
    serve = Path(pythonpath.split(os.pathsep)[0]) / "esm2_service" / "server" / "serve.py"
    return "embedded.local_url" in serve.read_text()


def _tunes_redis_allocator(pythonpath: str | None) -> bool:
    """Whether the tree on `pythonpath` (None: this one) starts redis-server with
    `esm2_service.allocator`'s settings."""
    if pythonpath is None:
        return True
    return (Path(pythonpath.split(os.pathsep)[0]) / "esm2_service" / "allocator.py").exists()


class Plumbing:
    """Redis, frontends and instant workers, for one tree of the code."""

    def __init__(
        self,
        frontends: int,
        workers: int,
        pythonpath: str | None,
        log_dir: Path,
        canned: int = 0,
        worker_args: tuple | None = None,
        redis_over: str = "serve",
    ):
        """`canned`: run `bench.canned_frontend` (sequences of that many residues) as the
        frontends and no workers: the gRPC floor. `worker_args`: run real workers
        (`esm2 worker` with these arguments) instead of instant ones. `redis_over`:
        "serve", as the tree's `esm2 serve` reaches its Redis (a Unix socket where it
        has one); "tcp", TCP on loopback, as a Redis on another host is reached."""
        from esm2_service.server.embedded_redis import EmbeddedRedis

        self.env = {**os.environ, "ESM2_METRICS_PORT": "0", "ESM2_LOG_LEVEL": "WARNING"}
        inherited = os.environ.get("PYTHONPATH")
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath or str(ROOT), inherited]))
        self.log_dir = log_dir
        self._redis_dir = tempfile.TemporaryDirectory(prefix="esm2-plumbing-")
        # Redis as that tree's `esm2 serve` starts it.
        redis_env = None if _tunes_redis_allocator(pythonpath) else dict(os.environ)
        unix = redis_over == "serve" and _serves_redis_on_a_unix_socket(pythonpath)
        self.redis = EmbeddedRedis(
            Path(self._redis_dir.name), environment=redis_env, unix_socket=unix
        )
        self.redis_transport = "unix" if unix else "tcp"
        self.env["REDIS_URL"] = self.redis.local_url
        self.processes: list[subprocess.Popen] = []
        self.frontends: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []
        try:
            port = 0
            for index in range(frontends):
                if canned:
                    args = ("bench.canned_frontend", "--port", port, "--residues", canned)
                else:
                    args = ("esm2_service.server", "--port", port)
                frontend = self._spawn(f"frontend{index}", *args)
                port = _expect(frontend, "listening on port").rsplit(" ", 1)[1]
                self.frontends.append(frontend)
            self.target = f"127.0.0.1:{port}"
            for index in range(0 if canned else workers):
                if worker_args is None:
                    module, args = "bench.instant_worker", ("--redis-url", self.redis.local_url)
                    worker_id = f"instant-{index}"
                else:
                    module, args, worker_id = "esm2_service.worker", worker_args, f"real-{index}"
                worker = self._spawn(f"worker{index}", module, *args, "--worker-id", worker_id)
                _expect(worker, "ready", WORKER_START_TIMEOUT_S)
                self.workers.append(worker)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, module: str, *args) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"{name}.log").open("a") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", module, *map(str, args)],
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        self.redis.stop()
        self._redis_dir.cleanup()

    def measure(self, cell: Cell, args: argparse.Namespace, tree: str) -> Reading:
        clients = [
            self._spawn(
                "client",
                "bench.plumbing",
                *("--client", self.target, "--in-flight", per_client, "--include", cell.outputs),
                *("--seconds", args.seconds, "--residues", args.residues),
            )
            for per_client in _split(cell.in_flight, args.clients)
        ]
        for client in clients:
            _expect(client, "ready")
        groups = {
            "frontend": [p.pid for p in self.frontends],
            "redis": [self.redis.process.pid],
            "worker": [p.pid for p in self.workers],
            "client": [p.pid for p in clients],
        }
        before = {kind: sum(map(cpu_seconds, pids)) for kind, pids in groups.items()}
        started = time.monotonic()
        with _ConnectionSampler(groups["frontend"], self.redis) as sampler:
            for client in clients:
                client.stdin.write("go\n")
                client.stdin.flush()
            reports = [json.loads(_expect(client, "{", args.seconds + 180)) for client in clients]
            seconds = time.monotonic() - started
            after = {kind: sum(map(cpu_seconds, pids)) for kind, pids in groups.items()}
        for client in clients:
            client.wait(timeout=30)
        outcomes: Counter[str] = Counter()
        for report in reports:
            outcomes.update(report["outcomes"])
        return Reading(
            cell=cell,
            tree=tree,
            seconds=seconds,
            items=sum(r["items"] for r in reports),
            residues=sum(r["residues"] for r in reports),
            tensor_bytes=sum(r["tensor_bytes"] for r in reports),
            outcomes=dict(outcomes),
            details={k: v for report in reports for k, v in report["details"].items()},
            cpu_s={kind: after[kind] - before[kind] for kind in groups},
            max_frontend_connections=sampler.peak,
            frontend_peak_rss_mb=max(status_bytes(p.pid, "VmHWM") for p in self.frontends) / 2**20,
            redis_transport=self.redis_transport,
        )

    def latency(self, calls: int) -> dict:
        """Median and 90th percentile ms of one 100-residue request, back to back."""
        client = self._spawn(
            "client", "bench.plumbing", "--client", self.target, "--timed-calls", calls
        )
        _expect(client, "ready")
        client.stdin.write("go\n")
        client.stdin.flush()
        result = json.loads(_expect(client, "{", 300))
        client.wait(timeout=30)
        return result

    def http_burst(self, requests: int, residues: int) -> dict:
        """`requests` concurrent HTTP encode requests of 8 on one HTTP door: outcomes by
        status, seconds, and the most Redis connections the door held."""
        door = self._spawn("http", "esm2_service.server.http_main", "--port", 0)
        port = int(_expect(door, "listening on port").rsplit(" ", 1)[1])
        self.frontends.append(door)  # stopped with the rest
        with _ConnectionSampler([door.pid], self.redis) as sampler:
            outcomes, seconds = asyncio.run(_burst(port, requests, residues))
        return {"outcomes": outcomes, "seconds": seconds, "max_redis_connections": sampler.peak}


async def _burst(port: int, requests: int, residues: int) -> tuple[dict, float]:
    import httpx

    base = f"http://127.0.0.1:{port}"
    body = {"items": [{"sequence": s} for s in sequences(residues)]}
    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
    async with httpx.AsyncClient(limits=limits, timeout=300) as client:
        while (await client.get(f"{base}/readyz")).status_code != 200:
            await asyncio.sleep(0.1)
        started = time.monotonic()

        async def one():
            try:
                return (await client.post(f"{base}/api/v3/esm2-8m/encode/", json=body)).status_code
            except httpx.HTTPError as error:
                return type(error).__name__

        outcomes = Counter(await asyncio.gather(*(one() for _ in range(requests))))
    return {str(code): n for code, n in outcomes.items()}, time.monotonic() - started


class _ConnectionSampler:
    """The most connections to Redis that any one frontend process held, sampled: its
    TCP connections to Redis's port, and the Unix socket connections Redis lists under
    its name (`esm2-server-PID`; psutil sees no peer of a Unix socket)."""

    def __init__(self, frontends: list[int], redis_server):
        self.frontends = [psutil.Process(pid) for pid in frontends]
        self.redis_port = redis_server.port
        self.redis = redis.Redis.from_url(redis_server.url) if redis_server.socket_path else None
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.redis is not None:
            self.redis.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            on_socket = self._unix_connections()
            for process in self.frontends:
                connections = process.net_connections(kind="tcp")
                to_redis = sum(
                    1 for c in connections if c.raddr and c.raddr.port == self.redis_port
                )
                self.peak = max(self.peak, to_redis + on_socket.get(process.pid, 0))
            self._stop.wait(0.2)

    def _unix_connections(self) -> Counter[int]:
        """Unix socket connections by the pid their name ends with."""
        if self.redis is None:
            return Counter()
        clients = self.redis.client_list()
        return Counter(
            int(c["name"].rsplit("-", 1)[1])
            for c in clients
            if c["addr"].startswith("/") and c["name"].rsplit("-", 1)[-1].isdigit()
        )


def _split(total: int, parts: int) -> list[int]:
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _expect(process: subprocess.Popen, prefix: str, timeout_s: float = START_TIMEOUT_S) -> str:
    """The process's first stdout line starting with `prefix`; raises if it ends first."""
    lines: list[str] = []

    def read():
        for line in process.stdout:
            if line.startswith(prefix) or prefix in line:
                lines.append(line.strip())
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not lines:
        raise RuntimeError(f"pid {process.pid} ({process.args[2]}) never printed {prefix!r}")
    return lines[0]


# ---- the report ------------------------------------------------------------------------


def cells(args: argparse.Namespace) -> list[Cell]:
    table = [Cell(outputs, 1, args.table_in_flight) for outputs in ("mean", "per_token")]
    table += [Cell("mean", frontends, args.table_in_flight * 4) for frontends in args.frontends]
    table += [Cell("mean", 1, in_flight) for in_flight in args.sweep]
    return list(dict.fromkeys(table))


def format_reading(reading: Reading) -> str:
    s = reading.seconds
    cpu = reading.cpu_ms_per_item
    failed = {k: v for k, v in reading.outcomes.items() if k != "OK"}
    return (
        f"| {reading.tree} | {reading.cell.outputs} | {reading.cell.frontends} "
        f"| {reading.cell.in_flight} | {reading.items / s:,.0f} | {reading.residues / s:,.0f} "
        f"| {reading.tensor_bytes / s / 1e6:,.1f} | {cpu['frontend']:.3f} | {cpu['redis']:.3f} "
        f"| {cpu['worker']:.3f} | {cpu['client']:.3f} | {reading.max_frontend_connections} "
        f"| {reading.frontend_peak_rss_mb:,.0f} "
        f"| {reading.outcomes.get('OK', 0):,} | {json.dumps(failed) if failed else '-'} |"
    )


HEADER = (
    "| tree | outputs | frontends | in flight | items/s | residues/s | tensor MB/s "
    "| frontend CPU ms/item | Redis | worker | client | Redis conns/frontend (max) "
    "| frontend peak RSS MB | requests OK | other outcomes |\n" + "|---" * 15 + "|"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.plumbing", description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0, help="per cell (default 8)")
    parser.add_argument("--residues", type=int, default=340, help="per sequence (default 340)")
    parser.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="instant workers (default 2)")
    parser.add_argument(
        "--table-in-flight", type=int, default=16, help="requests in flight for the CPU table"
    )
    parser.add_argument("--frontends", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sweep", type=int, nargs="+", default=[16, 128, 512, 2048])
    parser.add_argument("--against", help="a git revision to run side by side (e.g. main~1)")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also run each cell against bench.canned_frontend: gRPC alone, no Redis, no worker",
    )
    parser.add_argument(
        "--redis-over",
        choices=("serve", "tcp"),
        default="serve",
        help="serve (default): reach Redis as each tree's `esm2 serve` does (a Unix socket "
        "where it has one); tcp: TCP on loopback for every tree, as a Redis on another host "
        "(Kubernetes, Compose) is reached",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "plumbing.md")
    parser.add_argument("--small", action="store_true", help="a quick dry run of every stage")
    # A client process (internal).
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--in-flight", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--include", default="mean", help=argparse.SUPPRESS)
    parser.add_argument("--timed-calls", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--http-burst",
        type=int,
        default=2048,
        help="concurrent HTTP requests of 8 on one HTTP door, once (default 2048; 0: none)",
    )
    parser.add_argument(
        "--latency-calls",
        type=int,
        default=300,
        help="back-to-back 100-residue requests timed on one frontend (default 300; 0: none)",
    )
    parser.add_argument(
        "--latency-rounds",
        type=int,
        default=3,
        help="rounds of those calls per tree, the trees taking turns (default 3)",
    )
    args = parser.parse_args(argv)
    if args.small:
        args.seconds, args.frontends, args.sweep = 1.0, [1, 2], [8, 64]
        args.table_in_flight, args.workers, args.latency_calls = 4, 1, 20
        args.latency_rounds = 2
        args.http_burst = 64
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client:
        return client_main(args)
    trees: dict[str, str | None] = {"this": None}
    workdir = Path(tempfile.mkdtemp(prefix="esm2-plumbing-"))
    if args.against:
        trees[args.against] = tree_pythonpath(args.against, workdir)
    readings = []
    log_dir = workdir / "logs"
    print(f"logs in {log_dir}", file=sys.stderr)
    print(HEADER, flush=True)
    if args.floor:
        trees[FLOOR] = None
    for cell in cells(args):
        for tree, pythonpath in trees.items():
            canned = args.residues if tree == FLOOR else 0
            service = Plumbing(
                cell.frontends,
                args.workers,
                pythonpath,
                log_dir,
                canned,
                redis_over=args.redis_over,
            )
            try:
                reading = service.measure(cell, args, tree)
            finally:
                service.stop()
            readings.append(reading)
            print(format_reading(reading), flush=True)
    latencies = _latencies(args, trees, log_dir) if args.latency_calls else {}
    burst = {}
    if args.http_burst:
        service = Plumbing(1, args.workers, None, log_dir, redis_over=args.redis_over)
        try:
            burst = service.http_burst(args.http_burst, args.residues)
        finally:
            service.stop()
        print(f"HTTP burst of {args.http_burst}: {burst}", flush=True)
    _write(args, readings, latencies, burst)
    shutil.rmtree(workdir)
    return 0


def _latencies(args: argparse.Namespace, trees: dict, log_dir: Path) -> dict:
    """One 100-residue request at a time on each tree, the trees taking turns round by
    round, so that a slow spell of a shared host falls on all of them: per tree the
    median of the rounds' medians and 90th percentiles, and each round's median."""
    rounds: dict[str, list[dict]] = {tree: [] for tree in trees}
    for _ in range(args.latency_rounds):
        for tree, pythonpath in trees.items():
            canned = args.residues if tree == FLOOR else 0
            service = Plumbing(1, 1, pythonpath, log_dir, canned, redis_over=args.redis_over)
            try:
                rounds[tree].append(service.latency(args.latency_calls))
            finally:
                service.stop()
    latencies = {
        tree: {
            "median_ms": statistics.median(r["median_ms"] for r in readings),
            "p90_ms": statistics.median(r["p90_ms"] for r in readings),
            "round_medians_ms": [r["median_ms"] for r in readings],
        }
        for tree, readings in rounds.items()
    }
    for tree, latency in latencies.items():
        print(f"latency {tree}: {latency}", flush=True)
    return latencies


def _transports(readings: list[Reading]) -> str:
    """How each tree reached Redis: "TCP on loopback (c33f2ed), a Unix socket (this)"."""
    names = {"tcp": "TCP on loopback", "unix": "a Unix socket"}
    trees: dict[str, list[str]] = {}
    for reading in readings:
        tree_names = trees.setdefault(names[reading.redis_transport], [])
        if reading.tree not in tree_names:
            tree_names.append(reading.tree)
    return ", ".join(f"{name} ({', '.join(tree_names)})" for name, tree_names in trees.items())


def _write(args: argparse.Namespace, readings: list[Reading], latencies: dict, burst: dict) -> None:
    args.output.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.plumbing " + " ".join(sys.argv[1:])
    lines = [
        f"# bench.plumbing, {time.strftime('%Y-%m-%d')}",
        "",
        f"`{command.strip()}` on {os.cpu_count()} cores; {args.residues} residues a sequence,",
        f"8 a request, {args.clients} client processes, {args.workers} instant workers, "
        f"{args.seconds:g} s a cell. CPU is per item, over the whole cell. Redis reached over "
        + _transports(readings)
        + ".",
        "",
        HEADER,
        *map(format_reading, readings),
    ]
    if latencies:
        lines += [
            "",
            f"One 100-residue request at a time ({args.latency_rounds} rounds of "
            f"{args.latency_calls} calls per tree, the trees taking turns; one frontend, one "
            "instant worker), ms: the median over rounds of each round's figure:",
            "",
            "| tree | median | 90th percentile | each round's median |",
            "|---|---:|---:|---|",
            *(
                f"| {tree} | {t['median_ms']:.2f} | {t['p90_ms']:.2f} | "
                + ", ".join(f"{m:.2f}" for m in t["round_medians_ms"])
                + " |"
                for tree, t in latencies.items()
            ),
        ]
    if burst:
        lines += [
            "",
            f"{args.http_burst:,} concurrent HTTP encode requests of 8 on one HTTP door: "
            f"responses by status {burst['outcomes']} in {burst['seconds']:.1f} s; the door "
            f"held at most {burst['max_redis_connections']} Redis connections.",
        ]
    args.output.write_text("\n".join(lines) + "\n")
    document = {
        "readings": [{**asdict(r), "cell": asdict(r.cell)} for r in readings],
        "latency_ms": latencies,
        "http_burst": burst,
    }
    args.output.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
