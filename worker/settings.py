"""Worker settings: flags override environment variables, which override defaults."""

from __future__ import annotations

import argparse
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

from esm2_service.cli_help import SERVER_EXIT_CODES, HelpFormatter, epilog
from esm2_service.config import (
    DEFAULT_REDIS_URL,
    LOOPBACK,
    add_observability_arguments,
    add_setting,
    check_observability,
    env_or,
    redact_url,
)

PRECISIONS = ("fp32", "fp16", "bf16")


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _check_cpu_precision(precision: str) -> None:
    if precision == "fp16":
        raise ValueError("precision fp16 needs a CUDA device: CPUs run it slower than fp32")
    if precision == "bf16" and not cpu_has_bf16():
        raise ValueError(
            "precision bf16 on CPU needs AVX512-BF16 or AMX; without them it is slower than fp32"
        )


def _default_worker_id() -> str:
    """host-pid-random: unique even where containers share a hostname and a pid (host
    networking, each worker pid 1)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


# Queue entries one read takes: what a worker holds beyond the pass it runs stays small,
# so other workers get the rest of the queue.
READ_SIZE = 8
MAX_BATCH_SIZE = 256
# (queue entries, tokens) of one packed pass by device. A CPU is busy with one request's
# 8 items; a GPU idles on passes of 8 (its batches of 64 ran 1.5x faster than of 8 on an
# H200, issue 25), so a GPU worker packs several reads into one pass.
DEVICE_DEFAULTS = {"cpu": (8, 8192), "cuda": (64, 32768)}


@dataclass(frozen=True)
class WorkerSettings:
    redis_url: str = field(default=DEFAULT_REDIS_URL, repr=False)
    weights: str | None = None  # a fair-esm .pt; None: fair-esm's download and cache
    device: str = "cpu"
    precision: str = "fp32"  # fp16: CUDA only; bf16: CUDA, or CPUs with bf16 instructions
    threads: int = 0  # intra-op threads; 0: the cores this process may use
    # Queue entries in one packed pass (taken in reads of at most READ_SIZE) and its
    # tokens; 0: the device's default (DEVICE_DEFAULTS).
    batch_size: int = 0
    max_batch_tokens: int = 0
    # CPU batches that ask only for embeddings and logits run on OpenVINO (where installed):
    # "on", or "off" for the torch engine only.
    openvino: str = "on"
    # Write a batch's replies while the next batch computes: "on", "off", or "auto" (on
    # for GPUs, whose computing leaves the CPU idle; a CPU worker's cores compute).
    write_behind: str = "auto"
    lane_max_wait_s: float = 10.0  # a queue lane waiting this long gets every other batch
    block_ms: int = 1000  # one blocking read of the queue
    claim_idle_s: float = 30.0  # entries pending this long with a silent worker are claimed
    max_deliveries: int = 3  # deliveries of one entry before it is dead-lettered
    heartbeat_s: float = 2.0
    result_ttl_s: int = 600
    max_reply_chunks: int = 64  # ~4 MiB each: a reply stream's bound before the worker waits
    max_batch_s: float = 600.0  # a batch silent this long (no output) marks the worker stuck
    reader_stall_s: float = 60.0  # a reader silent this long has the rest of its item dropped
    worker_id: str = field(default_factory=_default_worker_id)
    log_level: str = "INFO"
    log_format: str = "text"
    metrics_port: int = 0  # 0: no metrics endpoint (several workers share a machine)
    metrics_host: str = LOOPBACK

    def __post_init__(self) -> None:
        check_observability(self.metrics_port, self.log_format)
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device {self.device!r} is not cpu, cuda or cuda:N")
        self._resolve_device_defaults()
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.device == "cpu":
            _check_cpu_precision(self.precision)
        if self.threads < 0:
            raise ValueError(f"threads must be 0 (auto) or positive, got {self.threads}")
        if self.openvino not in ("on", "off"):
            raise ValueError(f"openvino must be on or off, got {self.openvino!r}")
        if self.write_behind not in ("auto", "on", "off"):
            raise ValueError(f"write_behind must be auto, on or off, got {self.write_behind!r}")
        if self.max_deliveries < 1:
            raise ValueError(f"max_deliveries must be at least 1, got {self.max_deliveries}")
        if self.claim_idle_s <= 2 * self.heartbeat_s:
            raise ValueError(
                f"claim_idle_s ({self.claim_idle_s}) must exceed twice heartbeat_s "
                f"({self.heartbeat_s}): a live worker refreshes its entries every heartbeat"
            )

    def _resolve_device_defaults(self) -> None:
        """Sets a batch bound left at 0 to its device's default; checks both."""
        defaults = DEVICE_DEFAULTS["cpu" if self.device == "cpu" else "cuda"]
        for name, default in zip(("batch_size", "max_batch_tokens"), defaults, strict=True):
            if getattr(self, name) == 0:
                object.__setattr__(self, name, default)  # frozen: resolved once, here
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size {self.batch_size} is outside 1..{MAX_BATCH_SIZE}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be positive, got {self.max_batch_tokens}")

    @property
    def writes_behind(self) -> bool:
        """Whether batches' replies are written while the next batch computes."""
        return self.write_behind == "on" or (self.write_behind == "auto" and self.device != "cpu")

    def describe(self) -> str:
        return f"{self!r} redis_url={redact_url(self.redis_url)}"


# Flags whose name, environment variable and default follow the settings field.
_TUNING_FLAGS = (
    ("--result-ttl-s", int, "reply streams expire this long after their last write"),
    (
        "--max-reply-chunks",
        int,
        "chunks (~4 MiB each) a reply stream may hold before the worker waits",
    ),
    ("--reader-stall-s", float, "a client that reads nothing this long has its item dropped"),
    ("--max-batch-s", float, "a batch without output this long stops the heartbeat (stuck worker)"),
    (
        "--lane-max-wait-s",
        float,
        "a queue lane whose oldest item waited this long gets every other batch, so short "
        "items cannot starve long ones",
    ),
)


def build_parser(prog: str = "esm2 worker") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="An ESM-2 model worker: takes items from the Redis queue in packed "
        "batches, runs the model on them and writes the results back for the frontends. "
        "'esm2 serve' runs workers for you; run more on other machines against one Redis.",
        epilog=epilog(
            "esm2 worker --redis-url redis://queue-host:6379/0 --device cuda --precision fp16",
            SERVER_EXIT_CODES,
        ),
        formatter_class=HelpFormatter,
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser, *, include_redis: bool = True) -> None:
    d = WorkerSettings()
    if include_redis:
        parser.add_argument(
            "--redis-url",
            default=env_or("REDIS_URL", d.redis_url),
            help=f"Redis URL (REDIS_URL, default {d.redis_url})",
        )
    parser.add_argument(
        "--weights",
        default=env_or("ESM2_WEIGHTS"),
        help="fair-esm checkpoint .pt, its -contact-regression.pt beside it (ESM2_WEIGHTS); "
        "unset: download esm2_t6_8M_UR50D through fair-esm",
    )
    parser.add_argument(
        "--device",
        default=env_or("ESM2_DEVICE", d.device),
        help=f"cpu, cuda or cuda:N (ESM2_DEVICE, default {d.device})",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=env_or("ESM2_PRECISION", d.precision),
        help="compute precision (ESM2_PRECISION): fp32 matches fair-esm within 1e-4; fp16 "
        "(CUDA) and bf16 (CUDA, or CPUs with AVX512-BF16/AMX) within 1e-2 relative: attention "
        "and the output and feed-forward products in half precision, the rest in fp32",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=int(env_or("ESM2_THREADS", "0")),
        help="torch intra-op threads; 0: every core this process may use (ESM2_THREADS). "
        "esm2 serve divides the cores among its workers",
    )
    cpu, cuda = DEVICE_DEFAULTS["cpu"], DEVICE_DEFAULTS["cuda"]
    add_setting(
        parser,
        "--batch-size",
        0,
        f"queue entries in one packed forward pass, read {READ_SIZE} at a time; 0: "
        f"{cpu[0]} on a CPU, {cuda[0]} on a GPU",
        kind=int,
    )
    add_setting(
        parser,
        "--max-batch-tokens",
        0,
        f"tokens in one packed forward pass; 0: {cpu[1]} on a CPU, {cuda[1]} on a GPU",
        kind=int,
    )
    parser.add_argument(
        "--openvino",
        choices=("on", "off"),
        default=env_or("ESM2_OPENVINO", d.openvino),
        help="CPU batches asking for no contacts or attentions run on OpenVINO, if installed "
        "(ESM2_OPENVINO, default on): faster at every length; off: the torch engine only",
    )
    parser.add_argument(
        "--write-behind",
        choices=("auto", "on", "off"),
        default=env_or("ESM2_WRITE_BEHIND", d.write_behind),
        help="write a batch's results while the next batch computes (ESM2_WRITE_BEHIND, "
        "default auto: on for GPUs, off for CPUs)",
    )
    add_setting(
        parser,
        "--claim-idle-s",
        d.claim_idle_s,
        "claim entries of a worker silent this long",
        kind=float,
    )
    add_setting(
        parser,
        "--max-deliveries",
        d.max_deliveries,
        "attempts per item before it is dead-lettered",
        kind=int,
    )
    for flag, kind, help_text in _TUNING_FLAGS:
        default = getattr(d, flag.removeprefix("--").replace("-", "_"))
        add_setting(parser, flag, default, help_text, kind=kind)
    parser.add_argument("--worker-id", default=env_or("ESM2_WORKER_ID"), help="default: host-pid")
    parser.add_argument(
        "--log-level",
        default=env_or("ESM2_LOG_LEVEL", d.log_level),
        help=f"DEBUG, INFO, WARNING or ERROR (ESM2_LOG_LEVEL, default {d.log_level})",
    )
    add_observability_arguments(
        parser,
        metrics_port=d.metrics_port,
        metrics_help="default 0: none (esm2 serve gives worker i its base + 1 + i)",
    )


def settings_from_args(args: argparse.Namespace, **overrides) -> WorkerSettings:
    values = dict(
        redis_url=getattr(args, "redis_url", DEFAULT_REDIS_URL),
        weights=args.weights,
        device=args.device,
        precision=args.precision,
        threads=args.threads,
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens,
        openvino=args.openvino,
        write_behind=args.write_behind,
        claim_idle_s=args.claim_idle_s,
        max_deliveries=args.max_deliveries,
        result_ttl_s=args.result_ttl_s,
        max_reply_chunks=args.max_reply_chunks,
        reader_stall_s=args.reader_stall_s,
        max_batch_s=args.max_batch_s,
        lane_max_wait_s=args.lane_max_wait_s,
        log_level=args.log_level,
        log_format=args.log_format,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )
    if args.worker_id:
        values["worker_id"] = args.worker_id
    values.update(overrides)
    return WorkerSettings(**values)
