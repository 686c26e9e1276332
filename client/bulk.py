"""`esm2 encode` of a FASTA file of any size: streamed, bounded, resumable.

The file is read record by record; each accepted record becomes one piece, or, with
long sequences split into windows, several. Pieces go out in requests of up to 8,
with at most `concurrency` requests in flight (a thread each), so memory holds only
those and the records not yet in a shard (see h5store.py), whatever the file's size.
Results are written as records complete, in any order: the file is keyed by each
record's key (its id, or its accession: bulk_records.RECORD_KEYS).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import grpc
import numpy as np
from tqdm import tqdm

from esm2_service.validation import MAX_TOKENS

from .bulk_records import Accepted, Reject, merge_windows, window_starts
from .client import Esm2Client
from .h5store import JobMismatch, ShardedStore
from .interrupts import CtrlC
from .output import record_arrays
from .results import EncodeResult
from .rich_errors import InvalidArgumentError, ServiceUnreachableError, cancelled_unseen

REQUEST_ITEMS = 8
# A request the service could not take now (queue full, restarting) is retried after
# these pauses; then the job stops, resumable.
RETRY_PAUSES_S = (1, 2, 4, 8, 15, 30)
_RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
# How often the wait for a request checks for a Ctrl-C that Python swallowed (interrupts.py).
CTRL_C_CHECK_S = 0.25


@dataclass(frozen=True)
class BulkSettings:
    """Everything that shapes the output: a resumed job must keep all of it."""

    include: tuple[str, ...]
    layers: tuple[int, ...]
    dtype: str
    long: str  # "reject" or "windows"
    window: int
    overlap: int
    key: str = "id"  # see bulk_records.RECORD_KEYS

    def job(self) -> dict:
        settings = {
            "include": list(self.include),
            "layers": list(self.layers),
            "dtype": self.dtype,
            "long": self.long,
            "key": self.key,
        }
        if self.long == "windows":
            settings |= {"window": self.window, "overlap": self.overlap}
        return settings

    def request_include(self, windowed: bool) -> tuple[str, ...]:
        """A windowed record's mean is recomputed from its merged per-token embeddings."""
        if windowed and "mean" in self.include and "per_token" not in self.include:
            return (*self.include, "per_token")
        return self.include


@dataclass
class Summary:
    written: int = 0
    residues: int = 0
    skipped: int = 0  # written by an earlier run of the same job
    rejects: list[Reject] = field(default_factory=list)
    random_weights: bool = False
    vocab_tokens: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Piece:
    record: Accepted
    start: int  # of the window in the record's sequence
    sequence: str


@dataclass
class _Pending:
    record: Accepted
    starts: list[int]
    results: dict[int, EncodeResult] = field(default_factory=dict)


class BulkEncoder:
    def __init__(
        self,
        client: Esm2Client,
        settings: BulkSettings,
        store: ShardedStore,
        concurrency: int,
        progress: tqdm,
        ctrl_c: CtrlC | None = None,
    ):
        self.client, self.settings, self.store = client, settings, store
        self.concurrency, self.progress = concurrency, progress
        self.ctrl_c = ctrl_c or CtrlC()
        self.summary = Summary()
        self._pending: dict[str, _Pending] = {}
        self._batches: dict[bool, list[Piece]] = {False: [], True: []}
        self._in_flight: dict[Future, tuple[bool, list[Piece]]] = {}
        self._stopping = threading.Event()  # ends the pauses between retries
        self._outage_reported = False
        self._outage_lock = threading.Lock()

    def run(self, screened: Iterable[Accepted | Reject], done: dict[str, int]) -> Summary:
        """Encodes every accepted record not in `done` (id -> checksum); collects rejects."""
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="esm2-encode")
        self._pool = pool
        try:
            for entry in screened:
                if isinstance(entry, Reject):
                    self.summary.rejects.append(entry)
                elif entry.id in done:
                    self._skip(entry, done[entry.id])
                else:
                    self._queue(entry)
            for windowed, batch in self._batches.items():
                if batch:
                    self._send(windowed, batch)
            while self._in_flight:
                self._collect()
        finally:
            self._stopping.set()
            pool.shutdown(wait=False, cancel_futures=True)
            self._save_finished()
            self.store.flush()
        return self.summary

    def _skip(self, record: Accepted, checksum: int) -> None:
        if checksum != record.checksum:
            raise JobMismatch(
                f"record {record.id!r} (line {record.line}) has changed since it was written: "
                "the FASTA file is not the one this job started with"
            )
        self.summary.skipped += 1
        self.progress.update(len(record.sequence))

    def _queue(self, record: Accepted) -> None:
        starts = [0]
        if len(record.sequence) > MAX_TOKENS:
            starts = window_starts(
                len(record.sequence), self.settings.window, self.settings.overlap
            )
        windowed = len(starts) > 1
        self._pending[record.id] = _Pending(record, starts)
        size = self.settings.window if windowed else len(record.sequence)
        for start in starts:
            batch = self._batches[windowed]
            batch.append(Piece(record, start, record.sequence[start : start + size]))
            if len(batch) == REQUEST_ITEMS:
                self._send(windowed, batch)
                self._batches[windowed] = []
        while len(self._in_flight) >= self.concurrency:
            self._collect()

    def _send(self, windowed: bool, pieces: list[Piece]) -> None:
        future = self._pool.submit(self._encode, pieces, self.settings.request_include(windowed))
        self._in_flight[future] = (windowed, pieces)

    def _encode(self, pieces: list[Piece], include: tuple[str, ...]) -> list[EncodeResult | str]:
        """One result per piece, or the service's reason for refusing it."""
        try:
            return self._encode_with_retries([piece.sequence for piece in pieces], include)
        except InvalidArgumentError as error:
            if len(pieces) == 1:
                return ["; ".join(f"{f}: {d}" for f, d in error.violations)]
            return [result for piece in pieces for result in self._encode([piece], include)]

    def _encode_with_retries(self, sequences: list[str], include) -> list[EncodeResult]:
        for pause in (*RETRY_PAUSES_S, None):
            try:
                results = self.client.encode(
                    sequences, include, self.settings.layers, self.settings.dtype
                )
                self._outage_reported = False
                return results
            except grpc.RpcError as error:
                if pause is None or not _retried(error):
                    raise
                self._report_outage(error)
                if self._stopping.wait(pause):
                    raise
        raise AssertionError("unreachable")

    def _report_outage(self, error: grpc.RpcError) -> None:
        """Says at once, and once per outage, that the service is not answering: the
        retries can take a minute."""
        with self._outage_lock:
            if error.code() != grpc.StatusCode.UNAVAILABLE or self._outage_reported:
                return
            self._outage_reported = True
        if isinstance(error, ServiceUnreachableError):
            problem = str(error)  # names the address and what to check
        else:
            problem = f"the service is unavailable ({error.details()})"
        self.progress.write(
            f"esm2 encode: {problem}; retrying for up to {sum(RETRY_PAUSES_S):g} s "
            "(Ctrl-C stops; the same command continues later)",
            file=sys.stderr,
        )

    def _collect(self) -> None:
        finished: set[Future] = set()
        while not finished:
            self.ctrl_c.check()
            finished, _ = wait(list(self._in_flight), CTRL_C_CHECK_S, FIRST_COMPLETED)
        for future in finished:
            _, pieces = self._in_flight.pop(future)
            for piece, result in zip(pieces, future.result(), strict=True):
                self._take(piece, result)

    def _save_finished(self) -> None:
        """On the way out (even an interrupted one): keeps what already came back."""
        finished = [
            future
            for future in self._in_flight
            if future.done() and not future.cancelled() and future.exception() is None
        ]
        for future in finished:
            _, pieces = self._in_flight.pop(future)
            for piece, result in zip(pieces, future.result(), strict=True):
                self._take(piece, result)

    def _take(self, piece: Piece, result: EncodeResult | str) -> None:
        pending = self._pending.get(piece.record.id)
        if pending is None:
            return  # an earlier window was refused
        record = pending.record
        if isinstance(result, str):
            del self._pending[record.id]
            self.summary.rejects.append(Reject(record.id, record.line, f"refused: {result}"))
            return
        self.store.check_model(result.model.checkpoint_sha256)
        self.summary.random_weights |= result.model.random_weights
        self.summary.vocab_tokens = result.vocab_tokens
        pending.results[piece.start] = result
        if len(pending.results) == len(pending.starts):
            del self._pending[record.id]
            self._write(pending)

    def _write(self, pending: _Pending) -> None:
        record = pending.record
        results = [pending.results[start] for start in pending.starts]
        if len(results) == 1:
            arrays = record_arrays(results[0])
        else:
            arrays = self._merged(len(record.sequence), pending.starts, results)
        attributes = {
            "id": record.id,
            "index": record.index,
            "line": record.line,
            "length": len(record.sequence),
            "windows": len(results),
            "checksum": record.checksum,
        }
        self.store.add(attributes, arrays)
        self.summary.written += 1
        self.summary.residues += len(record.sequence)
        self.progress.update(len(record.sequence))

    def _merged(
        self, length: int, starts: list[int], results: list[EncodeResult]
    ) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for layer in results[0].per_token:
            merged = merge_windows(length, starts, [r.per_token[layer] for r in results])
            if "per_token" in self.settings.include:
                arrays[f"per_token/layer{layer}"] = merged
            if "mean" in self.settings.include:
                arrays[f"mean/layer{layer}"] = (
                    merged.astype(np.float64).mean(0).astype(merged.dtype)
                )
        for layer in results[0].bos:
            arrays[f"bos/layer{layer}"] = np.mean([r.bos[layer] for r in results], axis=0).astype(
                results[0].bos[layer].dtype
            )
        if results[0].logits is not None:
            arrays["logits"] = merge_windows(length, starts, [r.logits for r in results])
        return dict(sorted(arrays.items()))


def _retried(error: grpc.RpcError) -> bool:
    """The service could not take the request now: full, restarting or unreachable."""
    return error.code() in _RETRIED or cancelled_unseen(error)


def count_residues(screened: Iterator[Accepted | Reject]) -> tuple[int, int]:
    """(entries, residues of the accepted records): the progress bar's total."""
    entries = residues = 0
    for entry in screened:
        entries += 1
        if isinstance(entry, Accepted):
            residues += len(entry.sequence)
    return entries, residues


def print_summary(summary: Summary, output: str, rejects_path: str, seconds: float) -> None:
    rate = summary.residues / seconds if seconds > 0 else 0.0
    parts = [
        f"{summary.written:,} records ({summary.residues:,} residues) written to {output} "
        f"in {seconds:.1f} s ({rate:,.0f} residues/s)"
    ]
    if summary.skipped:
        parts.append(f"{summary.skipped:,} already written by an earlier run")
    if summary.rejects:
        parts.append(f"{len(summary.rejects):,} rejected, listed in {rejects_path}")
    print("esm2 encode: " + "; ".join(parts), file=sys.stderr)
