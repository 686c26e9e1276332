"""gRPC clients of the `esm2.v1.Esm2Service` service: `Esm2Client` and `AsyncEsm2Client`.

Both check a list of sequences with the service's own rules, split it into
requests of at most 8 items, run up to `max_concurrency` of them at once, and
return one result per sequence in the caller's order. Invalid input raises
`InvalidArgumentError` (a `grpc.RpcError`) naming every violation by its index in
the caller's list. A target where no gRPC connection can be made raises
`ServiceUnreachableError` saying what to check; other server errors surface
unchanged, as `grpc.RpcError` (sync) or `grpc.aio.AioRpcError` (async).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import grpc.experimental

from esm2_service.alphabet import uppercase_residues
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.esm2.v1 import esm2_pb2_grpc
from esm2_service.metadata import AUTHORIZATION
from esm2_service.validation import (
    FieldViolation,
    Violations,
    encode_violations,
    predict_violations,
)
from esm2_service.variants import score_violations

from .params import (
    MAX_ITEMS_PER_REQUEST,
    EncodeSpec,
    check_batch_size,
    check_sequences,
    parse_dtype,
    predict_request,
    split_batches,
)
from .results import (
    CompletedItem,
    EncodeResult,
    PredictResult,
    StreamAssembler,
    predict_result,
)
from .rich_errors import InvalidArgumentError, shift_variant, unreachable
from .scores import ScoreAssembler, ScoreResult, merge_results, plan_requests, score_request

Metadata = Sequence[tuple[str, str | bytes]]
PathLike = str | os.PathLike[str]
R = TypeVar("R")
# Turns the items of one request into the call's response stream: packed (EncodePacked,
# PredictPacked) or one message a piece (Encode, Predict).
StartCall = Callable[[list[str], bool], Any]
MakeResult = Callable[[CompletedItem, int], R]
# The violations of a whole list of sequences, checked as one request of any length.
CheckList = Callable[[list[str]], Violations]
Batch = tuple[int, list[str]]  # (offset of its first item in the caller's list, items)


def tls_credentials(
    ca: PathLike | None = None, cert: PathLike | None = None, key: PathLike | None = None
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files.

    Args:
        ca: the CA bundle that signed the server's certificate; None: the system's roots.
        cert, key: this client's certificate chain and private key, for a server that
            requires client certificates (mutual TLS); both or neither.
    """
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs its key: give tls_cert and tls_key")

    def read(path: PathLike | None) -> bytes | None:
        return None if path is None else Path(path).read_bytes()

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert)
    )


def _channel_credentials(
    credentials: grpc.ChannelCredentials | None,
    tls_ca: PathLike | None,
    tls_cert: PathLike | None,
    tls_key: PathLike | None,
) -> grpc.ChannelCredentials | None:
    if tls_ca is None and tls_cert is None and tls_key is None:
        return credentials
    if credentials is not None:
        raise ValueError("give credentials or tls_ca/tls_cert/tls_key, not both")
    return tls_credentials(tls_ca, tls_cert, tls_key)


def _call_metadata(metadata: Metadata | None, token: str | None) -> tuple | None:
    pairs = tuple(metadata or ())
    if token is None:
        return pairs or None
    if not token or any(character.isspace() for character in token):
        raise ValueError("token must be non-empty, without spaces")
    if any(key.lower() == AUTHORIZATION for key, _ in pairs):
        raise ValueError("metadata already holds 'authorization'; give it or token, not both")
    return (*pairs, (AUTHORIZATION, f"Token {token}"))


# Encode and Predict streams are read on the calling thread. Without this gRPC starts
# a thread to drive each call when none is running, which costs a sequential caller
# about 0.1-0.3 ms per request (measured against a live service).
_SYNC_CHANNEL_OPTIONS = [(grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]


class _ClientBase:
    """Settings both clients share; see `Esm2Client` for their meaning."""

    def __init__(
        self,
        *,
        timeout_s: float | None,
        metadata: Metadata | None,
        token: str | None,
        max_concurrency: int,
        batch_size: int,
    ):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self._call_options: dict[str, Any] = {
            "timeout": timeout_s,
            "metadata": _call_metadata(metadata, token),
        }
        self._max_concurrency = max_concurrency
        self._batch_size = check_batch_size(batch_size)
        # Encode and Predict go packed (far less CPU at both ends) until a server says it
        # has no packed methods; then this client sends the plain ones.
        self._packed = True

    def _batches(self, sequences: Sequence[str], check_list: CheckList) -> list[Batch]:
        """One batch per request, residues uppercased; InvalidArgumentError, before any
        request is sent, listing every violation in the whole list."""
        sequences = check_sequences(sequences)
        violations = check_list(sequences)
        if violations:
            raise InvalidArgumentError((v.field, v.description) for v in violations)
        return split_batches(list(map(uppercase_residues, sequences)), self._batch_size)


def _encode_check(spec: EncodeSpec) -> CheckList:
    def check(sequences: list[str]) -> Violations:
        found = Violations()
        if sequences:
            found = encode_violations(spec.request(sequences), max_items=None)
        found.extend(Violations(spec.unknown_names))
        return found

    return check


def _predict_check(dtype: int, unknown_dtype: tuple[FieldViolation, ...]) -> CheckList:
    def check(sequences: list[str]) -> Violations:
        found = Violations()
        if sequences:
            found = predict_violations(predict_request(sequences, dtype), max_items=None)
        found.extend(Violations(unknown_dtype))
        return found

    return check


class _Refusals:
    """The requests of one call that the server refused as invalid.

    The client checks a list before sending it, so only a server whose rules differ
    from the client's (another version) refuses one. Then the call sends no further
    requests, lets those in flight end (the refused ones end at once), and raises one
    InvalidArgumentError with the violations of every refused request, each item
    numbered in the caller's list.
    """

    def __init__(self) -> None:
        self._errors: list[tuple[int, InvalidArgumentError]] = []

    def __bool__(self) -> bool:
        return bool(self._errors)

    def keep(self, error: grpc.RpcError, offset: int) -> bool:
        """Whether `error` (of the request starting at `offset`) was a refusal, kept."""
        if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
            return False
        self._errors.append((offset, InvalidArgumentError.from_server(error, offset)))
        return True

    def raise_any(self) -> None:
        errors = [error for _, error in sorted(self._errors, key=lambda pair: pair[0])]
        if errors:
            # A parameter's violation comes once from every request: merged keeps one.
            raise InvalidArgumentError.merged(errors)


def _planned_score_requests(
    wild_type: str, variants: Sequence[str] | None, scan: bool, strategies: Iterable[str] | str
) -> list[tuple[int, pb.ScoreRequest]]:
    """The requests of one score, or InvalidArgumentError with every violation of the
    service's rules in the whole list, before any is sent."""
    request = score_request(wild_type, variants, scan, strategies)
    violations = score_violations(request, limits=False)
    if violations:
        raise InvalidArgumentError((v.field, v.description) for v in violations)
    request.wild_type = uppercase_residues(request.wild_type)
    return plan_requests(request)


def _score_refusal(error: grpc.RpcError, offset: int, target: str) -> grpc.RpcError:
    """A refusal of the request whose first variant is the caller's `offset`, its
    variants renumbered in the caller's list; other errors as `unreachable` leaves them."""
    if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
        return unreachable(error, target)
    refused = InvalidArgumentError.from_server(error, 0)
    return InvalidArgumentError(
        [(shift_variant(field, offset), text) for field, text in refused.violations],
        refused.request_ids,
    )


class _Stub(esm2_pb2_grpc.Esm2ServiceStub):
    """The generated stub, with the responses of Encode, Predict and their packed twins
    left serialized: `StreamAssembler` copies a tensor's bytes once, where parsing the
    message and reading its bytes field copy them twice more. The packed twins take
    the plain request, whose fields (and so bytes) theirs are."""

    def __init__(self, channel):
        super().__init__(channel)
        service = pb.DESCRIPTOR.services_by_name["Esm2Service"].full_name
        for method, request in (
            ("Encode", pb.EncodeRequest),
            ("EncodePacked", pb.EncodeRequest),
            ("Predict", pb.PredictRequest),
            ("PredictPacked", pb.PredictRequest),
        ):
            serialized = channel.unary_stream(
                f"/{service}/{method}",
                request_serializer=request.SerializeToString,
                response_deserializer=None,
                _registered_method=True,
            )
            setattr(self, method, serialized)

    def encode(self, packed: bool):
        return self.EncodePacked if packed else self.Encode

    def predict(self, packed: bool):
        return self.PredictPacked if packed else self.Predict


def _older_server(error: grpc.RpcError, packed: bool) -> bool:
    """Whether a packed call failed only because the server predates the packed methods."""
    return packed and error.code() == grpc.StatusCode.UNIMPLEMENTED


def _results(items: list[CompletedItem], offset: int, make_result: MakeResult[R]) -> list[R]:
    return [make_result(item, offset + item.index) for item in items]


class Esm2Client(_ClientBase):
    """A blocking client; thread-safe. Use as a context manager or call `close()`.

    Args:
        target: "host:port" of the service.
        timeout_s: deadline of each RPC in seconds; None (default) for none.
        metadata: (key, value) pairs sent with every RPC.
        token: sent as `authorization: Token <token>` with every RPC, for a service
            that requires tokens; None (default) for none.
        credentials: TLS channel credentials; None (default) for a plaintext channel
            unless a tls_* argument is given.
        tls_ca: use TLS, trusting the server certificates this PEM CA bundle signed
            (see `tls_credentials`); None: the system's roots if tls_cert is given.
        tls_cert, tls_key: PEM client certificate and key, for mutual TLS.
        max_concurrency: requests in flight at once when a list is split (default 8).
        batch_size: sequences per request, 1 to 8 (default 8).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_concurrency: int = 8,
        batch_size: int = MAX_ITEMS_PER_REQUEST,
        token: str | None = None,
        tls_ca: PathLike | None = None,
        tls_cert: PathLike | None = None,
        tls_key: PathLike | None = None,
    ):
        super().__init__(
            timeout_s=timeout_s,
            metadata=metadata,
            token=token,
            max_concurrency=max_concurrency,
            batch_size=batch_size,
        )
        self._target = target
        credentials = _channel_credentials(credentials, tls_ca, tls_cert, tls_key)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=_SYNC_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=_SYNC_CHANNEL_OPTIONS)
        self._stub = _Stub(self._channel)

    def __enter__(self) -> Esm2Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel; calls in progress are cancelled."""
        self._channel.close()

    def encode(
        self,
        sequences: Sequence[str],
        include: Iterable[str] | str = ("mean",),
        repr_layers: Iterable[int] | int = (-1,),
        dtype: str = "float32",
    ) -> list[EncodeResult]:
        """Embeddings and other tensors of `sequences`, one result per sequence, in order.

        Args:
            sequences: protein sequences (amino-acid letters, either case); [] returns []
                without a call.
            include: any of "mean", "per_token", "bos", "contacts", "logits", "attentions".
            repr_layers: layers 0 to 6 for mean, per_token and bos; -1 is the last.
            dtype: wire precision, "float32", "float16" or "bfloat16"; arrays come back
                as float16 for "float16" and float32 otherwise.

        Raises:
            InvalidArgumentError: a `grpc.RpcError` listing every invalid sequence or
                parameter (unknown names among them), sequences numbered in `sequences`;
                raised before any request is sent, or when the server refuses one.
            ServiceUnreachableError: a `grpc.RpcError` (UNAVAILABLE) saying which
                address no gRPC connection could be made to, and what to check.
            grpc.RpcError: the server failed the request.
            ResultStreamError: the response stream was malformed or incomplete.
        """
        spec = EncodeSpec.parse(include, repr_layers, dtype)
        return self._run(
            self._batches(sequences, _encode_check(spec)),
            lambda items, packed: self._stub.encode(packed)(
                spec.request(items), **self._call_options
            ),
            spec.result,
        )

    def predict(self, sequences: Sequence[str], dtype: str = "float32") -> list[PredictResult]:
        """Logits at the `<mask>` tokens of each sequence, one result per sequence, in order.

        Each sequence needs at least one "<mask>". Raises as `encode` does.
        """
        wire_dtype, unknown_dtype = parse_dtype(dtype)
        return self._run(
            self._batches(sequences, _predict_check(wire_dtype, unknown_dtype)),
            lambda items, packed: self._stub.predict(packed)(
                predict_request(items, wire_dtype), **self._call_options
            ),
            predict_result,
        )

    def score(
        self,
        wild_type: str,
        variants: Sequence[str] | None = None,
        *,
        scan: bool = False,
        strategies: Iterable[str] | str = ("masked_marginal",),
        on_scores: Callable[[int], None] | None = None,
    ) -> ScoreResult:
        """Zero-shot scores of `variants` of `wild_type` (or, with `scan=True`, of every
        single substitution), one per variant under each strategy.

        Args:
            wild_type: the wild-type sequence, 1 to 2,048 residues.
            variants: "A42G" (1-based), multi-mutants "A42G:L45P"; None with scan.
            scan: score every single substitution at every position instead.
            strategies: any of "masked_marginal" (default), "wt_marginal",
                "pseudo_log_likelihood".
            on_scores: called with the number of scores each message brings, as they
                stream in (for progress).

        Raises:
            ValueError: an unknown strategy name.
            InvalidArgumentError: every problem with the request, variants numbered in
                `variants`; raised before the request is sent.
            grpc.RpcError: the server failed the request.
            ResultStreamError: the response stream was malformed or incomplete.
        """
        parts = []
        for offset, request in _planned_score_requests(wild_type, variants, scan, strategies):
            assembler = ScoreAssembler(list(request.variants))
            call = self._stub.Score(request, **self._call_options)
            try:
                for message in call:
                    scored = assembler.add(message)
                    if on_scores is not None and scored:
                        on_scores(scored)
            except grpc.RpcError as error:
                raise _score_refusal(error, offset, self._target) from None
            finally:
                call.cancel()
            parts.append(assembler.finish())
        return merge_results(parts)

    def status(self) -> pb.GetStatusResponse:
        """The service's workers, queue depth and whether any runs random weights."""
        try:
            return self._stub.GetStatus(pb.GetStatusRequest(), **self._call_options)
        except grpc.RpcError as error:
            raise unreachable(error, self._target) from None

    def _run(
        self, batches: list[Batch], start_call: StartCall, make_result: MakeResult[R]
    ) -> list[R]:
        refusals = _Refusals()

        def run_batch(batch: Batch) -> list[R]:
            offset, items = batch
            if refusals:
                return []
            try:
                assembler = self._read_stream(items, start_call)
            except grpc.RpcError as error:
                if refusals.keep(error, offset):
                    return []
                raise unreachable(error, self._target) from None
            return _results(assembler.finish(), offset, make_result)

        if len(batches) <= 1:
            results = [result for batch in batches for result in run_batch(batch)]
        else:
            results = _run_in_threads(run_batch, batches, min(self._max_concurrency, len(batches)))
        refusals.raise_any()
        return results

    def _read_stream(self, items: list[str], start_call: StartCall) -> StreamAssembler:
        """One request's response stream, read into an assembler; a packed call that the
        server does not know is made again as a plain one (and so are later calls)."""
        assembler = StreamAssembler(len(items))
        packed = self._packed
        call = start_call(items, packed)
        add = assembler.add_packed if packed else assembler.add
        try:
            for message in call:
                add(message)
        except grpc.RpcError as error:
            if not _older_server(error, packed):
                raise
            self._packed = False
            return self._read_stream(items, start_call)
        finally:
            call.cancel()  # a no-op once the stream has ended
        return assembler


def _run_in_threads(
    function: Callable[[Any], list[R]], batches: list[Any], workers: int
) -> list[R]:
    """`function` over `batches` on a thread pool; the first failure is raised as is."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="esm2-client")
    futures: list[Future[list[R]]] = [pool.submit(function, batch) for batch in batches]
    try:
        wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            if future.done():
                future.result()  # raises a failed request's exception, unchanged
        return [result for future in futures for result in future.result()]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class AsyncEsm2Client(_ClientBase):
    """The asyncio twin of `Esm2Client`, on `grpc.aio`; same arguments and methods.

    Create it inside a running event loop; use `async with` or `await close()`.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_concurrency: int = 8,
        batch_size: int = MAX_ITEMS_PER_REQUEST,
        token: str | None = None,
        tls_ca: PathLike | None = None,
        tls_cert: PathLike | None = None,
        tls_key: PathLike | None = None,
    ):
        super().__init__(
            timeout_s=timeout_s,
            metadata=metadata,
            token=token,
            max_concurrency=max_concurrency,
            batch_size=batch_size,
        )
        self._target = target
        credentials = _channel_credentials(credentials, tls_ca, tls_cert, tls_key)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials)
        self._stub = _Stub(self._channel)

    async def __aenter__(self) -> AsyncEsm2Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; calls in progress are cancelled."""
        await self._channel.close()

    async def encode(
        self,
        sequences: Sequence[str],
        include: Iterable[str] | str = ("mean",),
        repr_layers: Iterable[int] | int = (-1,),
        dtype: str = "float32",
    ) -> list[EncodeResult]:
        """See `Esm2Client.encode`; raises `grpc.aio.AioRpcError` for server errors
        other than INVALID_ARGUMENT."""
        spec = EncodeSpec.parse(include, repr_layers, dtype)
        return await self._run(
            self._batches(sequences, _encode_check(spec)),
            lambda items, packed: self._stub.encode(packed)(
                spec.request(items), **self._call_options
            ),
            spec.result,
        )

    async def predict(
        self, sequences: Sequence[str], dtype: str = "float32"
    ) -> list[PredictResult]:
        """See `Esm2Client.predict`; raises `grpc.aio.AioRpcError` for server errors
        other than INVALID_ARGUMENT."""
        wire_dtype, unknown_dtype = parse_dtype(dtype)
        return await self._run(
            self._batches(sequences, _predict_check(wire_dtype, unknown_dtype)),
            lambda items, packed: self._stub.predict(packed)(
                predict_request(items, wire_dtype), **self._call_options
            ),
            predict_result,
        )

    async def score(
        self,
        wild_type: str,
        variants: Sequence[str] | None = None,
        *,
        scan: bool = False,
        strategies: Iterable[str] | str = ("masked_marginal",),
        on_scores: Callable[[int], None] | None = None,
    ) -> ScoreResult:
        """See `Esm2Client.score`."""
        parts = []
        for offset, request in _planned_score_requests(wild_type, variants, scan, strategies):
            assembler = ScoreAssembler(list(request.variants))
            call = self._stub.Score(request, **self._call_options)
            try:
                async for message in call:
                    scored = assembler.add(message)
                    if on_scores is not None and scored:
                        on_scores(scored)
            except grpc.RpcError as error:
                raise _score_refusal(error, offset, self._target) from None
            finally:
                call.cancel()
            parts.append(assembler.finish())
        return merge_results(parts)

    async def status(self) -> pb.GetStatusResponse:
        """See `Esm2Client.status`."""
        try:
            return await self._stub.GetStatus(pb.GetStatusRequest(), **self._call_options)
        except grpc.RpcError as error:
            raise unreachable(error, self._target) from None

    async def _run(
        self, batches: list[Batch], start_call: StartCall, make_result: MakeResult[R]
    ) -> list[R]:
        semaphore = asyncio.Semaphore(self._max_concurrency)
        refusals = _Refusals()

        async def run_batch(offset: int, items: list[str]) -> list[R]:
            async with semaphore:
                if refusals:
                    return []
                try:
                    assembler = await self._read_stream(items, start_call)
                except grpc.RpcError as error:
                    if refusals.keep(error, offset):
                        return []
                    raise unreachable(error, self._target) from None
            return _results(assembler.finish(), offset, make_result)

        tasks = [asyncio.ensure_future(run_batch(*batch)) for batch in batches]
        try:
            per_batch = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        refusals.raise_any()
        return [result for batch in per_batch for result in batch]

    async def _read_stream(self, items: list[str], start_call: StartCall) -> StreamAssembler:
        """One request's response stream, read into an assembler; a packed call that the
        server does not know is made again as a plain one (and so are later calls)."""
        assembler = StreamAssembler(len(items))
        packed = self._packed
        call = start_call(items, packed)
        add = assembler.add_packed if packed else assembler.add
        try:
            async for message in call:
                add(message)
        except grpc.RpcError as error:
            if not _older_server(error, packed):
                raise
            self._packed = False
            return await self._read_stream(items, start_call)
        finally:
            call.cancel()  # a no-op once the stream has ended
        return assembler
