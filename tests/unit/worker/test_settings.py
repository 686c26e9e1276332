"""The worker's settings: device-dependent batch bounds, flags and their checks."""

from __future__ import annotations

import pytest

from esm2_service.worker.settings import (
    DEVICE_DEFAULTS,
    WorkerSettings,
    build_parser,
    settings_from_args,
)


@pytest.mark.parametrize(
    ("device", "expected"), [("cpu", (8, 8192)), ("cuda", (64, 32768)), ("cuda:1", (64, 32768))]
)
def test_batch_bounds_left_unset_follow_the_device(device, expected):
    settings = WorkerSettings(device=device, precision="fp32")
    assert (settings.batch_size, settings.max_batch_tokens) == expected
    assert DEVICE_DEFAULTS["cpu" if device == "cpu" else "cuda"] == expected


def test_batch_flags_and_environment_override_the_device_defaults(monkeypatch):
    monkeypatch.setenv("ESM2_MAX_BATCH_TOKENS", "4096")
    args = build_parser().parse_args(["--device", "cuda", "--batch-size", "16"])
    settings = settings_from_args(args)
    assert (settings.batch_size, settings.max_batch_tokens) == (16, 4096)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"batch_size": 257}, "batch_size 257 is outside 1..256"),
        ({"batch_size": -1}, "batch_size -1 is outside 1..256"),
        ({"max_batch_tokens": -5}, "max_batch_tokens must be positive, got -5"),
    ],
)
def test_bad_batch_bounds_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        WorkerSettings(**values)
