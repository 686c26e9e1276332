"""JSON log lines, worker metrics, Redis URL redaction and the ports `esm2 serve` hands out."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from prometheus_client import generate_latest

from esm2_service.config import redact_url
from esm2_service.logs import JsonFormatter, configure_logging
from esm2_service.server import serve
from esm2_service.worker.metrics import WorkerMetrics, abandoned_outcome


def _record(message: str, *args, **extra) -> logging.LogRecord:
    record = logging.LogRecord("esm2.test", logging.WARNING, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return record


def test_json_lines_hold_the_fields_and_context():
    formatter = JsonFormatter({"worker_id": "w-1"})
    line = formatter.format(_record("item %d of %s", 3, "abc", request_id="abc"))
    document = json.loads(line)
    assert document.pop("ts").endswith("+00:00")
    assert document == {
        "level": "WARNING",
        "logger": "esm2.test",
        "message": "item 3 of abc",
        "worker_id": "w-1",
        "request_id": "abc",
    }
    assert "request_id" not in json.loads(formatter.format(_record("x", request_id=None)))


def test_json_lines_carry_tracebacks_on_one_line():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", (), None)
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert "RuntimeError: boom" in json.loads(line)["exception"]


def test_configure_logging_json_and_text(monkeypatch):
    calls = []  # the root logger is pytest's: only look at what would be installed
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: calls.append(kwargs))
    configure_logging("info", "json", fields={"worker_id": "w"})
    configure_logging("DEBUG", "text", text_format="%(levelname)s %(name)s %(message)s")
    (json_call, text_call) = calls
    assert (json_call["level"], json_call["force"], text_call["level"]) == ("INFO", True, "DEBUG")
    record = _record("request_id=%s done", "r2", request_id="r2")
    document = json.loads(json_call["handlers"][0].format(record))
    assert (document["request_id"], document["worker_id"]) == ("r2", "w")
    assert text_call["handlers"][0].format(record) == "WARNING esm2.test request_id=r2 done"
    with pytest.raises(ValueError, match="'xml' is not one of text, json"):
        configure_logging("INFO", "xml")


def test_worker_metrics_of_a_batch():
    metrics = WorkerMetrics()
    metrics.batch(items=3, tokens=300, seconds=0.5)
    metrics.items("completed", 3)
    metrics.items(abandoned_outcome("CANCELLED"))
    metrics.items(abandoned_outcome("RESOURCE_EXHAUSTED"))
    get = metrics.registry.get_sample_value
    assert get("esm2_worker_batch_size_sum") == 3
    assert get("esm2_worker_batch_tokens_sum") == 300
    assert get("esm2_worker_tokens_total") == 300
    assert get("esm2_worker_tokens_per_second") == 600
    assert get("esm2_worker_padding_ratio") == 0
    assert get("esm2_worker_items_total", {"outcome": "completed"}) == 3
    assert get("esm2_worker_items_total", {"outcome": "cancelled"}) == 1
    assert get("esm2_worker_items_total", {"outcome": "failed"}) == 1
    assert get("esm2_worker_items_total", {"outcome": "dead_lettered"}) == 0
    metrics.batch(items=1, tokens=90, seconds=0.1, padded_tokens=10)
    assert get("esm2_worker_padding_ratio") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown item outcome 'lost'"):
        metrics.items("lost")


def test_registries_are_separate():
    first, second = WorkerMetrics(), WorkerMetrics()
    first.batch(items=1, tokens=10, seconds=1)
    assert second.registry.get_sample_value("esm2_worker_tokens_total") == 0
    assert b"esm2_requests_total" not in generate_latest(first.registry)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("rediss://user:s3cret@redis.internal/1", "rediss://user:***@redis.internal/1"),
        ("redis://:s3cret@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        ("redis://h:1/0?password=s3cret&db=2", "redis://h:1/0?password=***&db=2"),
        ("unix:///tmp/esm2/redis.sock?db=0", "unix:///tmp/esm2/redis.sock?db=0"),
        ("unix://:s3cret@/tmp/esm2/redis.sock?db=0", "unix://:***@/tmp/esm2/redis.sock?db=0"),
    ],
)
def test_redact_url(url, redacted):
    assert redact_url(url) == redacted


def test_serve_gives_every_process_a_metrics_port_of_its_own():
    args = serve.build_parser().parse_args(["--workers", "2", "--metrics-port", "9100"])
    frontend = serve._frontend_args(args)
    assert frontend[frontend.index("--metrics-port") + 1] == "9100"
    ports = []
    for index in range(2):
        worker = serve._worker_args(args, index)
        ports.append(worker[worker.index("--metrics-port") + 1])
    assert ports == ["9101", "9102"]
    off = serve.build_parser().parse_args(["--metrics-port", "0"])
    worker = serve._worker_args(off, 0)
    assert worker[worker.index("--metrics-port") + 1] == "0"
    assert serve.main(["--metrics-port", "65535"]) == 2
