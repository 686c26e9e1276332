"""`python -m bench.gpu`: ESM-2 8M on a GPU, ours against the best in-process scripts.

One prepared command for a lent GPU machine, where it must end within 8 minutes:

    python -m bench.gpu                          # CUDA, fp16, 4,096 sequences, ~1.4 M residues
    python -m bench.gpu --device cpu --small     # a dry run of every stage, anywhere

Every throughput stage computes the mean embedding of the last layer of each sequence of
one corpus (lognormal lengths 30 to 1,022, median 300, random residues) and times its
first pass over the corpus on its own (every length unseen) beside warm passes:

- Hugging Face `EsmModel` (SDPA) in half precision, length-sorted batches of up to
  16,384 and 65,536 padded tokens: the anchor is its best warm pass;
- fair-esm in half precision, batched as its `extract.py` batches (length-sorted,
  4,096 tokens a batch, each mean copied to the host);
- our engine in-process: packed passes of up to the GPU worker's token budget, in
  arrival order (packing needs no sorting);
- the service: an embedded Redis, frontends, workers on the device and client
  processes sending the corpus in requests of 8, several in flight each; mean-only
  (a first and a warm pass), then per-token outputs (tensor GB/s).

NVML's GPU utilisation is sampled through every timed pass. Then: one 100-residue
request's latency through the service; 8 x 2,048 residues with every output (seconds,
peak GPU memory); each precision's largest error against fair-esm fp32 on the CPU.
Prints each result as it comes; writes bench/results/gpu-latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.baselines import hf_esm_model, padded_tokens, synchronize, work_item
from bench.corpus import Corpus, ensure_checkpoint, lognormal_corpus, random_sequence
from bench.memory import INCLUDE as ALL_OUTPUTS
from bench.plumbing import Plumbing, _arrays, _expect
from bench.report import RESULTS_DIR, machine_info
from esm2_service.worker.checkpoint import Checkpoint, build_fair_esm_model, load_checkpoint
from esm2_service.worker.settings import DEVICE_DEFAULTS
from esm2_service.worker.work import WorkItem

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HF_BUDGETS = (16_384, 65_536)  # padded tokens a batch
EXTRACT_TOKENS = 4096  # fair-esm extract.py's --toks_per_batch default
REQUEST_SIZE = 8


@dataclass(frozen=True)
class Scale:
    """The benchmark's sizes: full for a GPU, small for a dry run."""

    sequences: int = 4096
    max_length: int = 1022
    warm_passes: int = 2
    clients: int = 4
    in_flight: int = 16  # requests of 8 per client
    frontends: int = 2
    workers: int = 1
    pass_limit_s: float = 45.0  # a service pass stops sending after this long
    latency_calls: int = 100
    big_batch: tuple[int, int] = (8, 2048)  # sequences x residues, every output
    precision_sequences: int = 11


SMALL = Scale(64, 300, 1, 2, 2, 1, 1, 30.0, 10, (2, 128), 2)


def corpus_of(scale: Scale) -> Corpus:
    return lognormal_corpus(scale.sequences, 300.0, 0.6, (30, scale.max_length), seed=25)


# ---- in-process contenders ----------------------------------------------------------------


def budget_batches(sequences: list[str], budget: int, padded: bool) -> list[list[int]]:
    """Indices of `sequences` in consecutive batches of at most `budget` tokens (<cls> and
    <eos> counted): padded, every row costs the longest row's length."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = used = 0
    for index, sequence in enumerate(sequences):
        tokens = len(sequence) + 2
        cost = max(longest, tokens) * (len(current) + 1) if padded else used + tokens
        if current and cost > budget:
            batches.append(current)
            current, longest, used = [], 0, 0
        current.append(index)
        longest, used = max(longest, tokens), used + tokens
    if current:
        batches.append(current)
    return batches


def hf_pass(checkpoint: Checkpoint, corpus: Corpus, device: str, dtype, budget: int):
    """Hugging Face `EsmModel` over the corpus, length-sorted, `budget` padded tokens a
    batch; each batch's means copied to the host."""
    model = hf_esm_model(checkpoint).to(device=device, dtype=dtype)
    ordered = sorted(corpus.sequences, key=len)
    batches = [[ordered[i] for i in b] for b in budget_batches(ordered, budget, padded=True)]

    @torch.inference_mode()
    def run(batch: list[str]) -> None:
        ids, mask = padded_tokens(batch)
        ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        states = model(input_ids=ids, attention_mask=mask).last_hidden_state
        residues = mask.clone()  # the mean is over residues: no <cls>, no <eos>
        residues[:, 0] = 0
        residues[torch.arange(len(batch), device=device), mask.sum(1) - 1] = 0
        weights = residues.unsqueeze(-1).to(states.dtype)
        ((states * weights).sum(1) / weights.sum(1)).float().cpu()

    return warmed_up(run, batches, device)


def warmed_up(run: Callable[[list], None], batches: list[list], device: str):
    """A pass over `batches`, after one untimed run of a small batch."""
    run(batches[0][:2])

    def run_pass() -> None:
        for batch in batches:
            run(batch)
        synchronize(device)

    return run_pass


def fair_esm_pass(checkpoint: Checkpoint, corpus: Corpus, device: str, dtype):
    """fair-esm as its extract.py runs: length-sorted batches of EXTRACT_TOKENS tokens,
    each sequence's mean copied to the host on its own."""
    import esm

    model = build_fair_esm_model(checkpoint).to(device)
    model = model.half() if dtype == torch.float16 else model.to(dtype)
    convert = esm.data.Alphabet.from_architecture("ESM-1b").get_batch_converter(1022)
    dataset = esm.data.FastaBatchedDataset(corpus.ids, corpus.sequences)
    batches = [
        [(corpus.ids[i], corpus.sequences[i]) for i in indices]
        for indices in dataset.get_batch_indices(EXTRACT_TOKENS, extra_toks_per_seq=1)
    ]
    last = model.num_layers

    @torch.inference_mode()
    def run(batch) -> None:
        _, strings, tokens = convert(batch)
        states = model(tokens.to(device, non_blocking=True), repr_layers=[last])
        states = states["representations"][last]
        for row, sequence in enumerate(strings):
            states[row, 1 : len(sequence) + 1].mean(0).clone().cpu()

    return warmed_up(run, batches, device)


def engine_pass(checkpoint: Checkpoint, corpus: Corpus, device: str, dtype, budget: int):
    """Our engine as a worker builds and warms it up, over the corpus in arrival order,
    packed passes of up to `budget` tokens."""
    from esm2_service.worker.engine import Engine
    from esm2_service.worker.model import Esm2

    engine = Engine(Esm2.from_checkpoint(checkpoint), device, dtype)
    engine.warm_up()
    items = [work_item(sequence, engine.model.num_layers) for sequence in corpus.sequences]
    batches = [
        [items[i] for i in b] for b in budget_batches(corpus.sequences, budget, padded=False)
    ]

    def run_pass() -> None:
        for batch in batches:
            engine.run(batch, lambda output: None)
        synchronize(device)

    return engine, run_pass


# ---- timing and GPU utilisation -------------------------------------------------------------


class GpuBusy:
    """The share of time the GPU ran a kernel while in the block, from NVML's samples
    (None without NVML or on a CPU)."""

    INTERVAL_S = 0.05

    def __init__(self, device: str):
        self.handle = None
        if torch.device(device).type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                index = torch.device(device).index or 0
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            except Exception:  # no NVML: the figure is left out, the timing stands
                self.handle = None
        self.samples: list[int] = []
        self._stop = threading.Event()

    def _sample(self) -> None:
        import pynvml

        while not self._stop.wait(self.INTERVAL_S):
            self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    def __enter__(self) -> GpuBusy:
        if self.handle is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.handle is not None:
            self._thread.join()

    @property
    def share(self) -> float | None:
        return statistics.mean(self.samples) / 100 if self.samples else None


def timed(run_pass: Callable[[], object], device: str) -> dict:
    """Seconds and GPU busy share of one pass."""
    with GpuBusy(device) as busy:
        started = time.perf_counter()
        run_pass()
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "gpu_busy": busy.share}


def first_and_warm(name: str, run_pass, corpus: Corpus, device: str, warm: int) -> dict:
    """The first pass timed alone, then `warm` passes; residues/s of each."""
    first = timed(run_pass, device)
    warm_passes = [timed(run_pass, device) for _ in range(warm)]
    best = min(warm_passes, key=lambda p: p["seconds"])
    result = {
        "first": {**first, "residues_per_s": corpus.residues / first["seconds"]},
        "warm": [{**p, "residues_per_s": corpus.residues / p["seconds"]} for p in warm_passes],
        "best_warm_residues_per_s": corpus.residues / best["seconds"],
    }
    report(name, result)
    return result


def report(name: str, result: dict) -> None:
    first, best = result["first"], result["best_warm_residues_per_s"]
    busy = result["first"].get("gpu_busy")
    print(
        f"{name:48} first pass {first['residues_per_s']:>12,.0f} res/s, best warm "
        f"{best:>12,.0f} res/s" + (f", GPU busy {busy:.0%} (first)" if busy is not None else ""),
        flush=True,
    )


# ---- the service ----------------------------------------------------------------------------


async def _client_passes(args: argparse.Namespace) -> None:
    """A client process: its share of the corpus in requests of 8, `in_flight` at a time,
    once per "go" line on stdin; one JSON line per pass."""
    from esm2_service.client import AsyncEsm2Client

    scale = SMALL if args.small else Scale()
    corpus = corpus_of(scale)
    mine = corpus.sequences[args.share :: args.shares]
    requests = [mine[i : i + REQUEST_SIZE] for i in range(0, len(mine), REQUEST_SIZE)]
    loop = asyncio.get_running_loop()
    async with AsyncEsm2Client(args.client, max_concurrency=args.in_flight, timeout_s=600) as c:
        await c.status()
        print("ready", flush=True)
        while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "go":
            print(json.dumps(await _one_pass(c, requests, args)), flush=True)


async def _one_pass(client, requests: list[list[str]], args: argparse.Namespace) -> dict:
    import grpc

    outcomes: Counter[str] = Counter()
    done = {"residues": 0, "items": 0, "tensor_bytes": 0}
    pending = iter(requests)
    started = time.monotonic()
    stop_at = started + args.pass_limit_s

    async def caller() -> None:
        for batch in pending:
            if time.monotonic() > stop_at:
                return
            try:
                results = await client.encode(batch, include=[args.include])
            except grpc.aio.AioRpcError as error:
                outcomes[error.code().name] += 1
                continue
            outcomes["OK"] += 1
            done["items"] += len(results)
            done["residues"] += sum(map(len, batch))
            done["tensor_bytes"] += sum(a.nbytes for r in results for a in _arrays(r))

    await asyncio.gather(*(caller() for _ in range(args.in_flight)))
    return {**done, "seconds": time.monotonic() - started, "outcomes": dict(outcomes)}


class ServiceUnderTest:
    """The service on `device` and client processes that each hold a share of the corpus."""

    def __init__(self, args: argparse.Namespace, scale: Scale, checkpoint: Path, log_dir: Path):
        self.args, self.scale = args, scale
        worker_args = (
            *("--device", args.device, "--precision", args.precision),
            *("--weights", checkpoint, "--threads", 2),
        )
        self.service = Plumbing(
            scale.frontends, scale.workers, None, log_dir, worker_args=worker_args
        )

    def passes(self, include: str, count: int) -> list[dict]:
        """`count` passes over the corpus with `include` outputs, every client at once."""
        clients = [self._client(share, include) for share in range(self.scale.clients)]
        results = []
        try:
            for client in clients:
                _expect(client, "ready")
            for _ in range(count):
                results.append(self._pass(clients))
        finally:
            for client in clients:
                client.stdin.close()
                client.wait(timeout=60)
        return results

    def _client(self, share: int, include: str):
        return self.service._spawn(
            "client",
            "bench.gpu",
            *("--client", self.service.target, "--share", share, "--shares", self.scale.clients),
            *("--in-flight", self.scale.in_flight, "--include", include),
            *("--pass-limit-s", self.scale.pass_limit_s),
            *(["--small"] if self.args.small else []),
        )

    def _pass(self, clients) -> dict:
        with GpuBusy(self.args.device) as busy:
            for client in clients:
                client.stdin.write("go\n")
                client.stdin.flush()
            timeout = self.scale.pass_limit_s + 300
            reports = [json.loads(_expect(client, "{", timeout)) for client in clients]
        seconds = max(r["seconds"] for r in reports)
        outcomes: Counter[str] = Counter()
        for r in reports:
            outcomes.update(r["outcomes"])
        total = {key: sum(r[key] for r in reports) for key in ("residues", "items", "tensor_bytes")}
        return {
            **total,
            "seconds": seconds,
            "residues_per_s": total["residues"] / seconds,
            "tensor_gb_per_s": total["tensor_bytes"] / seconds / 1e9,
            "gpu_busy": busy.share,
            "outcomes": dict(outcomes),
        }

    def stop(self) -> None:
        self.service.stop()


def service_stage(args, scale: Scale, checkpoint: Path, corpus: Corpus, log_dir: Path) -> dict:
    under_test = ServiceUnderTest(args, scale, checkpoint, log_dir)
    try:
        first, *warm = under_test.passes("mean", 1 + scale.warm_passes)
        (per_token,) = under_test.passes("per_token", 1)
        latency = under_test.service.latency(scale.latency_calls)
    finally:
        under_test.stop()
    result = {
        "first": first,
        "warm": warm,
        "best_warm_residues_per_s": max(p["residues_per_s"] for p in warm),
        "per_token": per_token,
        "latency_100_residues": latency,
        "corpus_residues": corpus.residues,
    }
    report("the service (mean, last layer)", result)
    print(
        f"{'the service (per-token, last layer)':48} {per_token['residues_per_s']:>12,.0f} "
        f"res/s, {per_token['tensor_gb_per_s']:.2f} GB/s of tensors; outcomes "
        f"{per_token['outcomes']}",
        flush=True,
    )
    print(f"{'one 100-residue request through the service':48} {latency}", flush=True)
    return result


# ---- the rest -------------------------------------------------------------------------------


def big_batch(engine, device: str, shape: tuple[int, int]) -> dict:
    """8 x 2,048 residues with every output of every layer: seconds, peak GPU memory
    beyond the model's."""
    count, length = shape
    rng = np.random.default_rng(2048)
    layers = tuple(range(engine.model.num_layers + 1))
    items = [
        WorkItem(work_item(random_sequence(rng, length)).token_ids, frozenset(ALL_OUTPUTS), layers)
        for _ in range(count)
    ]
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    emitted = [0]
    started = time.perf_counter()
    engine.run(items, lambda output: emitted.__setitem__(0, emitted[0] + len(output.data)))
    synchronize(device)
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if on_gpu else None
    result = {"seconds": seconds, "peak_gpu_gib_over_model": peak, "output_bytes": emitted[0]}
    print(f"{f'{count} x {length} residues, every output':48} {result}", flush=True)
    return result


def precision_stage(checkpoint: Path, device: str, count: int) -> dict:
    from bench.precision import errors, read_sequences

    table = errors(checkpoint, read_sequences()[:count], device)
    for name, rows in table.items():
        worst = {kind: f"{row['max_abs']:.1e}" for kind, row in rows.items()}
        print(f"{f'{name} on {device} vs fair-esm fp32 (CPU)':48} {worst}", flush=True)
    return table


def verdicts(results: dict) -> dict:
    """The issue's targets, each as measured/target."""
    anchor = max(r["best_warm_residues_per_s"] for k, r in results.items() if k.startswith("hf"))
    ours = results["engine"]
    found = {
        "engine first pass / HF best warm (target >= 2)": ours["first"]["residues_per_s"] / anchor,
        "engine first pass / engine best warm (target >= 0.9)": ours["first"]["residues_per_s"]
        / ours["best_warm_residues_per_s"],
    }
    service = results.get("service")
    if service:
        found["service best warm / HF best warm (target >= 1)"] = (
            service["best_warm_residues_per_s"] / anchor
        )
        found["service GPU busy, warm (target >= 0.7)"] = service["warm"][-1]["gpu_busy"]
        found["service per-token GB/s (target >= 1)"] = service["per_token"]["tensor_gb_per_s"]
    return found


def run(args: argparse.Namespace) -> dict:
    scale = SMALL if args.small else Scale()
    dtype = DTYPES[args.precision]
    checkpoint_path = ensure_checkpoint()
    checkpoint = load_checkpoint(checkpoint_path)
    corpus = corpus_of(scale)
    print(corpus.describe(), f"on {args.device}, {args.precision}", flush=True)
    results: dict = {"machine": machine_info(args.device), "corpus": corpus.summary()}
    budget = DEVICE_DEFAULTS["cpu" if args.device == "cpu" else "cuda"][1]
    engine, engine_run = engine_pass(checkpoint, corpus, args.device, dtype, budget)
    results["engine"] = first_and_warm(
        f"our engine, packed passes of {budget:,} tokens", engine_run, corpus, args.device,
        scale.warm_passes,
    )  # fmt: skip
    for tokens in HF_BUDGETS:
        run_pass = hf_pass(checkpoint, corpus, args.device, dtype, tokens)
        results[f"hf_{tokens}"] = first_and_warm(
            f"HF EsmModel, sorted, {tokens:,} padded tokens", run_pass, corpus, args.device,
            scale.warm_passes,
        )  # fmt: skip
    run_pass = fair_esm_pass(checkpoint, corpus, args.device, dtype)
    results["fair_esm"] = first_and_warm(
        "fair-esm as extract.py runs it", run_pass, corpus, args.device, scale.warm_passes
    )
    results["big_batch"] = big_batch(engine, args.device, scale.big_batch)
    del engine
    if args.service:
        with tempfile.TemporaryDirectory(prefix="esm2-bench-gpu-") as log_dir:
            results["service"] = service_stage(args, scale, checkpoint_path, corpus, Path(log_dir))
    results["precision"] = precision_stage(checkpoint_path, args.device, scale.precision_sequences)
    results["verdicts"] = verdicts(results)
    for name, value in results["verdicts"].items():
        print(f"{name:60} {value if value is None else round(value, 3)}", flush=True)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--precision", choices=tuple(DTYPES), help="default fp16; fp32 on cpu")
    parser.add_argument("--small", action="store_true", help="a quick dry run of every stage")
    parser.add_argument("--no-service", dest="service", action="store_false")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "gpu-latest.json")
    # A client process (internal).
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--share", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--shares", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--in-flight", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--include", default="mean", help=argparse.SUPPRESS)
    parser.add_argument("--pass-limit-s", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.precision is None:
        args.precision = "fp32" if args.device == "cpu" else "fp16"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client:
        asyncio.run(_client_passes(args))
        return 0
    started = time.monotonic()
    results = run(args)
    results["seconds"] = time.monotonic() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"{results['seconds']:.0f} s in all; wrote {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
