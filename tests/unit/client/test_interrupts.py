"""Ctrl-C stops `esm2 encode` even where Python swallows the KeyboardInterrupt it raises
(inside a `__del__`): the handler records it and the job's loop checks the record."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest
from tqdm import tqdm

from esm2_service.client.bulk import CTRL_C_CHECK_S, BulkEncoder, BulkSettings
from esm2_service.client.bulk_records import Accepted
from esm2_service.client.client import Esm2Client
from esm2_service.client.h5store import ShardedStore
from esm2_service.client.interrupts import CtrlC, ctrl_c_stops


class PressesCtrlCWhenCollected:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)


def test_a_ctrl_c_raised_inside_a_del_is_swallowed_by_python_but_recorded(monkeypatch):
    swallowed = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: swallowed.append(unraisable))
    with ctrl_c_stops() as ctrl_c:
        try:
            PressesCtrlCWhenCollected()
        except KeyboardInterrupt:
            pytest.fail("the KeyboardInterrupt escaped the __del__; this test shows nothing")
        assert [type(u.exc_value) for u in swallowed] == [KeyboardInterrupt]
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.check()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_without_ctrl_c_the_check_passes():
    with ctrl_c_stops() as ctrl_c:
        ctrl_c.check()


def test_off_the_main_thread_python_keeps_its_handler():
    handlers = []

    def enter() -> None:
        with ctrl_c_stops():
            handlers.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert handlers == [signal.default_int_handler]


def test_a_job_waiting_on_the_service_stops_soon_after_a_swallowed_ctrl_c(fake_server, tmp_path):
    target, servicer = fake_server
    servicer.delay_s = 5.0  # the service answers long after Ctrl-C
    settings = BulkSettings(("mean",), (-1,), "float32", "reject", 1022, 0)
    store = ShardedStore(tmp_path / "out.h5", settings.job())
    records = [Accepted(f"r{i}", "MKTAYIAK", i + 1, i) for i in range(8)]
    ctrl_c = CtrlC()
    with Esm2Client(target) as client, tqdm(disable=True) as progress:
        encoder = BulkEncoder(client, settings, store, 1, progress, ctrl_c)
        threading.Timer(0.2, ctrl_c.pressed.set).start()  # what the handler records
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            encoder.run(records, {})
    assert time.monotonic() - started < 0.2 + 4 * CTRL_C_CHECK_S
    assert encoder.summary.written == 0
    assert not store.holds_records()
