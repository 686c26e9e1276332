"""`esm2 serve`'s flags: documented, loopback by default, passed to every process."""

from __future__ import annotations

import argparse

import pytest

from esm2_service.server import serve

SETTINGS_ENV = ("ESM2_HOST", "ESM2_METRICS_HOST", "ESM2_PRECISION", "ESM2_LOG_LEVEL")


@pytest.fixture
def parser(monkeypatch) -> argparse.ArgumentParser:
    for name in SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)
    return serve.build_parser()


def test_every_flag_has_help_text(parser):
    undocumented = [
        action.option_strings
        for action in parser._actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert undocumented == []


def test_defaults_bind_this_machine_only(parser):
    args = parser.parse_args([])
    assert (args.host, args.metrics_host) == ("127.0.0.1", "127.0.0.1")
    assert (args.precision, args.log_level, args.device) == ("fp32", "INFO", "cpu")


def test_flags_reach_the_frontend_and_every_worker(parser):
    args = parser.parse_args(
        ["--host", "0.0.0.0", "--metrics-host", "0.0.0.0", "--precision", "bf16"]
        + ["--log-level", "debug", "--workers", "2", "--threads", "1"]
    )

    def value(argv: list[str], flag: str) -> str:
        return argv[argv.index(flag) + 1]

    frontend = serve._frontend_args(args)
    assert [value(frontend, f) for f in ("--host", "--metrics-host", "--log-level")] == [
        "0.0.0.0",
        "0.0.0.0",
        "DEBUG",
    ]
    for index in range(2):
        worker = serve._worker_args(args, index)
        flags = ("--precision", "--metrics-host", "--log-level", "--threads")
        assert [value(worker, f) for f in flags] == ["bf16", "0.0.0.0", "DEBUG", "1"]


def test_bad_values_are_refused(parser, capsys):
    for argv in (["--precision", "fp8"], ["--log-level", "LOUD"]):
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(argv)
        assert exited.value.code == 2
    assert "invalid choice: 'LOUD'" in capsys.readouterr().err


def test_serve_says_ready_only_once_every_door_is_ready(tmp_path, caplog):
    """The gRPC frontend may be ready before the HTTP door's own health check has run;
    the one ready line waits for both (a request to either then succeeds at once)."""
    import subprocess
    import sys
    import threading

    from esm2_service.server.http_main import READY_LINE as HTTP_READY_LINE
    from esm2_service.server.main import READY_LINE

    go = tmp_path / "http-ready"
    waits_for_go = (
        "import pathlib, time\n"
        f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.02)\n"
        f"print({HTTP_READY_LINE!r}, flush=True)\n"
    )
    doors = [
        subprocess.Popen(
            [sys.executable, "-c", f"print({READY_LINE!r}, flush=True)"],
            stdout=subprocess.PIPE,
            text=True,
        ),
        subprocess.Popen([sys.executable, "-c", waits_for_go], stdout=subprocess.PIPE, text=True),
    ]
    caplog.set_level("INFO", logger=serve.log.name)
    announcer = threading.Thread(target=serve._announce_ready, args=(doors[:1], doors[1], "here"))
    try:
        announcer.start()
        doors[0].wait(timeout=30)
        announcer.join(timeout=1.0)
        assert announcer.is_alive(), "said ready before the HTTP door was"
        assert "ready to take requests" not in caplog.text
        go.touch()
        announcer.join(timeout=30)
        assert not announcer.is_alive()
        assert caplog.text.count("esm2 serve: ready to take requests on here") == 1
    finally:
        go.touch()
        for door in doors:
            door.wait(timeout=30)
            door.stdout.close()
