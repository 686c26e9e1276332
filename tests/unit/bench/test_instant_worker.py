"""bench.plumbing's instant model emits what the real engine emits, shape for shape."""

from __future__ import annotations

import sys

from support import ROOT

from esm2_service.alphabet import token_ids
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.worker.work import WorkItem

sys.path.insert(0, str(ROOT))
from bench.instant_worker import InstantRunner  # noqa: E402

sys.path.pop(0)

ALL = frozenset(value for value in pb.Include.values() if value != pb.INCLUDE_UNSPECIFIED)


def emitted(runner, items) -> list[tuple]:
    outputs = []
    runner.run(items, outputs.append)
    return sorted((o.item, o.kind, o.layer, o.shape, o.offset, len(o.data)) for o in outputs)


def test_the_instant_runner_emits_the_engines_shapes_and_sizes(full_checkpoint):
    from esm2_service.worker.checkpoint import load_checkpoint
    from esm2_service.worker.engine import Engine
    from esm2_service.worker.model import Esm2

    engine = Engine(Esm2.from_checkpoint(load_checkpoint(full_checkpoint)))
    items = [
        WorkItem(token_ids("MKTAYIAKQR"), ALL, (0, 6)),
        WorkItem(token_ids("AC<mask>DE<mask>"), frozenset(), (), predict=True),
        WorkItem(token_ids("MKV"), ALL, (6,), dtype=pb.DTYPE_FLOAT16),
    ]
    expected = emitted(engine, items)
    assert emitted(InstantRunner(), items) == expected
    assert len(expected) > 10
