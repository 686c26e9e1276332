"""`python -m bench.jobs`: protein engineers' jobs through the service, in one run.

Bulk: `esm2 encode` (the command line, a child process) over BULK_RECORDS sequences of
lognormal lengths, against this benchmark's own client (8 per request, 8 in flight) on
the same service and corpus, in alternated rounds: residues/s of each and their ratio
(the bulk path should keep the service at least 95% as busy). The command's peak RSS
for that file, and for one of MEMORY_RECORDS sequences (mean only) served by a tiny
checkpoint (the command's memory does not depend on the model; the tiny one keeps the
run short): it must not grow with the file.

Scoring: a full scan of TEM-1 (286 residues: 286 masked passes, 5,434 variants) against
the same 286 masked sequences sent by the client as Predict requests; and the latency of
one Encode of 270 residues (the scan's queue lane) alone and while the scan runs.
Writes bench/results/jobs.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.corpus import CACHE_DIR, DATA_DIR, ensure_checkpoint, lognormal_corpus
from bench.report import RESULTS_DIR, machine_info
from bench.service import ServiceProcesses
from esm2_service.alphabet import MASK_TOKEN
from esm2_service.client import Esm2Client
from esm2_service.client.fasta import read_fasta

BULK_RECORDS = 2000
MEMORY_RECORDS = 20000
BULK_TARGET = 0.95
LATENCY_CALLS = 5
ESM2 = [sys.executable, "-m", "esm2_service.client.cli"]


def progress(message: str) -> None:
    print(f"[bench.jobs] {message}", file=sys.stderr, flush=True)


def write_fasta(path: Path, ids: list[str], sequences: list[str]) -> None:
    with path.open("w") as file:
        for record_id, sequence in zip(ids, sequences, strict=True):
            file.write(f">{record_id}\n{sequence}\n")


def run_bulk(target: str, fasta: Path, out: Path, include: str = "mean") -> dict:
    """One `esm2 encode` run: its wall time and peak RSS (the kernel's, at exit)."""
    out.unlink(missing_ok=True)
    argv = [*ESM2, "encode", str(fasta), "-o", str(out), "--target", target, "--no-progress"]
    argv += ["--include", include]
    started = time.perf_counter()
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read()
    process.stderr.close()
    if process.returncode != 0:
        raise RuntimeError(f"esm2 encode exited {process.returncode}: {stderr}")
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024, "summary": stderr}


def bulk_rows(service: ServiceProcesses, repeats: int, folder: Path) -> dict:
    corpus = lognormal_corpus(count=BULK_RECORDS, seed=7)
    fasta = folder / "bulk.fasta"
    write_fasta(fasta, corpus.ids, corpus.sequences)
    progress(f"bulk: {corpus.describe()}; {repeats} rounds of client, then esm2 encode")
    client_s, bulk_s, peaks = [], [], []
    with Esm2Client(service.target, timeout_s=1200, max_concurrency=8) as client:
        client.encode(corpus.sequences[:64])  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            client.encode(corpus.sequences)
            client_s.append(time.perf_counter() - started)
            run = run_bulk(service.target, fasta, folder / "bulk.h5")
            bulk_s.append(run["seconds"])
            peaks.append(run["peak_rss_bytes"])
            progress(f"client {client_s[-1]:.1f} s, esm2 encode {bulk_s[-1]:.1f} s")
    client_rate = corpus.residues / min(client_s)
    bulk_rate = corpus.residues / min(bulk_s)
    return {
        "corpus": corpus.summary(),
        "client_residues_per_s": round(client_rate),
        "bulk_residues_per_s": round(bulk_rate),
        "bulk_over_client": round(bulk_rate / client_rate, 3),
        "target": BULK_TARGET,
        "client_seconds": [round(s, 1) for s in client_s],
        "bulk_seconds": [round(s, 1) for s in bulk_s],
        "bulk_peak_rss_bytes": max(peaks),
    }


def memory_rows(folder: Path, threads: int) -> dict:
    from esm2_service.worker.checkpoint import make_random_checkpoint

    tiny = make_random_checkpoint(folder / "tiny.pt", tiny=True, seed=3)
    rows = {}
    with ServiceProcesses(tiny, threads, CACHE_DIR / "logs") as service:
        service.start_worker("bench-jobs-tiny")
        service.wait_serving()
        for count in (BULK_RECORDS, MEMORY_RECORDS):
            corpus = lognormal_corpus(count=count, seed=11)
            fasta = folder / f"memory-{count}.fasta"
            write_fasta(fasta, corpus.ids, corpus.sequences)
            progress(f"memory: esm2 encode of {count:,} sequences, mean only (tiny checkpoint)")
            run = run_bulk(service.target, fasta, folder / f"memory-{count}.h5")
            rows[str(count)] = {
                "residues": corpus.residues,
                "fasta_bytes": fasta.stat().st_size,
                "seconds": round(run["seconds"], 1),
                "peak_rss_bytes": run["peak_rss_bytes"],
            }
    return rows


def tem1_wild_type() -> str:
    records = read_fasta(DATA_DIR / "P62593_tem1_variants.fasta")
    sequence = records[0].sequence  # P20P: synonymous, the wild type itself
    assert records[0].id.split("|")[1].endswith("P20P")
    return sequence


def scoring_rows(service: ServiceProcesses, repeats: int) -> dict:
    wild_type = tem1_wild_type()
    masked = [wild_type[:i] + MASK_TOKEN + wild_type[i + 1 :] for i in range(len(wild_type))]
    short, same_lane = wild_type[:100], wild_type[:270]
    progress(f"scoring: full scan of TEM-1 ({len(wild_type)} residues), {repeats} rounds")
    scan_s, predict_s = [], []
    alone_ms: dict[str, list[float]] = {"short": [], "same_lane": []}
    with Esm2Client(service.target, timeout_s=1200, max_concurrency=8) as client:
        client.predict(masked[:16])  # warm-up
        for _ in range(LATENCY_CALLS):
            for name, sequence in (("short", short), ("same_lane", same_lane)):
                started = time.perf_counter()
                client.encode([sequence])
                alone_ms[name].append(1000 * (time.perf_counter() - started))
        for _ in range(repeats):
            started = time.perf_counter()
            result = client.score(wild_type, scan=True)
            scan_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            client.predict(masked)
            predict_s.append(time.perf_counter() - started)
        during_ms = {
            name: encode_latency_during_scan(client, wild_type, sequence)
            for name, sequence in (("short", short), ("same_lane", same_lane))
        }
        batch_ms = 1000 * min(scan_s) / (len(wild_type) / 8)
    return {
        "wild_type_residues": len(wild_type),
        "variants": len(result.mutants),
        "forward_passes": result.forward_passes,
        "scan_seconds": round(min(scan_s), 2),
        "predict_same_passes_seconds": round(min(predict_s), 2),
        "scan_over_predict_time": round(min(scan_s) / min(predict_s), 3),
        "variants_per_s": round(len(result.mutants) / min(scan_s)),
        "scan_batch_ms": round(batch_ms, 1),
        "encode_alone_ms_p50": {k: round(statistics.median(v), 1) for k, v in alone_ms.items()},
        "encode_during_scan_ms": {k: [round(ms, 1) for ms in v] for k, v in during_ms.items()},
    }


def encode_latency_during_scan(client: Esm2Client, wild_type: str, sequence: str) -> list[float]:
    """Encodes `sequence` LATENCY_CALLS times while a scan runs, a second apart."""
    done = threading.Event()
    scan = threading.Thread(
        target=lambda: (client.score(wild_type, scan=True), done.set()), daemon=True
    )
    scan.start()
    time.sleep(1.0)  # the scan's window is full
    latencies = []
    while len(latencies) < LATENCY_CALLS and not done.is_set():
        started = time.perf_counter()
        client.encode([sequence])
        latencies.append(1000 * (time.perf_counter() - started))
        time.sleep(0.5)
    scan.join()
    return latencies


def _listed(values: list[float]) -> str:
    return ", ".join(f"{value:g}" for value in values)


def markdown(report: dict) -> list[str]:
    bulk, scoring = report["bulk"], report["scoring"]
    mib = 2**20
    verdict = "PASS" if bulk["bulk_over_client"] >= bulk["target"] else "FAIL"
    lines = [
        f"# Jobs: bulk encode and variant scoring ({report['machine']['cpu_model']})",
        "",
        f"Bulk, {bulk['corpus']['sequences']:,} sequences, {bulk['corpus']['residues']:,} "
        f"residues (median {bulk['corpus']['median_length']:g}), mean of the last layer:",
        "",
        "| path | residues/s | ratio |",
        "|---|---:|---:|",
        f"| benchmark client (8 per request, 8 in flight) | {bulk['client_residues_per_s']:,} "
        "| 1.00 |",
        f"| `esm2 encode` to HDF5 | {bulk['bulk_residues_per_s']:,} | "
        f"{bulk['bulk_over_client']:.2f} (target {bulk['target']}: {verdict}) |",
        "",
        "Peak RSS of `esm2 encode`, mean only:",
        "",
        "| sequences | residues | FASTA | peak RSS |",
        "|---:|---:|---:|---:|",
        f"| {bulk['corpus']['sequences']:,} (8M checkpoint) | {bulk['corpus']['residues']:,} | "
        f"| {bulk['bulk_peak_rss_bytes'] / mib:.0f} MiB |",
    ]
    for count, row in report["memory"].items():
        lines.append(
            f"| {int(count):,} (tiny checkpoint) | {row['residues']:,} | "
            f"{row['fasta_bytes'] / mib:.1f} MiB | {row['peak_rss_bytes'] / mib:.0f} MiB |"
        )
    lines += [
        "",
        f"Scoring: a full scan of TEM-1 ({scoring['wild_type_residues']} residues, "
        f"{scoring['variants']:,} variants, {scoring['forward_passes']} passes) in "
        f"{scoring['scan_seconds']} s ({scoring['variants_per_s']:,} variants/s); the same "
        f"{scoring['forward_passes']} masked sequences sent as Predict requests by the client: "
        f"{scoring['predict_same_passes_seconds']} s (scan / Predict: "
        f"{scoring['scan_over_predict_time']:.2f}).",
        f"One Encode while the scan runs (a scan batch takes {scoring['scan_batch_ms']} ms): "
        f"100 residues (a shorter queue lane): {scoring['encode_alone_ms_p50']['short']} ms "
        f"alone (p50), {_listed(scoring['encode_during_scan_ms']['short'])} ms during the "
        f"scan; 270 residues (the scan's lane): {scoring['encode_alone_ms_p50']['same_lane']} "
        f"ms alone, {_listed(scoring['encode_during_scan_ms']['same_lane'])} ms during it.",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.jobs", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--only", choices=("scoring", "bulk"), help="one part (its results only, elsewhere)"
    )
    args = parser.parse_args(argv)
    report = {"machine": machine_info()}
    with tempfile.TemporaryDirectory(prefix="esm2-bench-jobs-") as tmp:
        folder = Path(tmp)
        with ServiceProcesses(ensure_checkpoint(), args.threads, CACHE_DIR / "logs") as service:
            service.start_worker("bench-jobs-0")
            service.wait_serving()
            if args.only in (None, "scoring"):
                report["scoring"] = scoring_rows(service, args.repeats)
            if args.only in (None, "bulk"):
                report["bulk"] = bulk_rows(service, args.repeats, folder)
        if args.only in (None, "bulk"):
            report["memory"] = memory_rows(folder, args.threads)
    if args.only is not None:
        print(json.dumps(report, indent=1))
        return 0
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "jobs.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = markdown(report)
    (args.output / "jobs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
