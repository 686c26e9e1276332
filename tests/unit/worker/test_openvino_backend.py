"""The OpenVINO runner against fair-esm's ESM2.forward, and what it leaves to torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import assert_close, fair_esm_outputs

from esm2_service.alphabet import token_ids
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.worker.checkpoint import build_fair_esm_model, load_checkpoint
from esm2_service.worker.engine import Engine
from esm2_service.worker.model import Esm2
from esm2_service.worker.openvino_backend import OpenVinoRunner
from esm2_service.worker.settings import WorkerSettings
from esm2_service.worker.work import WorkItem

pytest.importorskip("openvino", reason="OpenVINO is a worker dependency: install .[worker]")

EMBEDDINGS = frozenset([pb.INCLUDE_MEAN, pb.INCLUDE_PER_TOKEN, pb.INCLUDE_BOS])
NAMES = {
    pb.INCLUDE_MEAN: "mean",
    pb.INCLUDE_PER_TOKEN: "per_token",
    pb.INCLUDE_BOS: "bos",
    pb.INCLUDE_LOGITS: "logits",
    pb.INCLUDE_CONTACTS: "contacts",
}
SEQUENCES = ["M", "MKTAYIAKQRQISFVKSHFSRQ", "ACDEFGHIKLMNPQRSTVWYXBUZO-", "GSHM" * 30, "WWW"]


def item(sequence: str, include=EMBEDDINGS | {pb.INCLUDE_LOGITS}, layers=(0, 2, 6), **kw):
    return WorkItem(token_ids(sequence), frozenset(include), layers, **kw)


def run(runner, items) -> dict:
    outputs = {}

    def emit(output):
        key = (output.item, output.kind, output.layer)
        outputs[key] = np.frombuffer(output.data, "<f4").reshape(output.shape)

    runner.run(items, emit)
    return outputs


@pytest.fixture(scope="module", params=["tiny", "full"])
def setup(request, tiny_checkpoint, full_checkpoint):
    path = tiny_checkpoint if request.param == "tiny" else full_checkpoint
    checkpoint = load_checkpoint(path)
    engine = Engine(Esm2.from_checkpoint(checkpoint))
    runner = OpenVinoRunner.for_engine(engine, torch.float32, threads=2)
    return runner, build_fair_esm_model(checkpoint)


def test_embeddings_logits_and_predict_match_fair_esm_in_mixed_length_batches(setup):
    runner, reference = setup
    items = [item(s) for s in SEQUENCES]
    items.append(item("MKT<mask>AYI<mask>AK", (), (), predict=True))
    before = runner.batches["openvino"]
    outputs = run(runner, items)
    assert runner.batches["openvino"] == before + 1
    assert len(outputs) == len(SEQUENCES) * (3 * 3 + 1) + 1
    for (index, kind, layer), actual in outputs.items():
        sequence = (SEQUENCES + ["MKT<mask>AYI<mask>AK"])[index]
        expected = fair_esm_outputs(reference, sequence)
        if items[index].predict:
            assert kind == pb.INCLUDE_LOGITS and actual.shape[0] == 2
            assert_close(actual, expected["mask_logits"], what="predict")
        elif kind == pb.INCLUDE_LOGITS:
            assert_close(actual, expected["logits"], what=f"{sequence[:6]} logits")
        else:
            assert_close(actual, expected[NAMES[kind]][layer], what=f"{sequence[:6]} {layer}")


def test_contacts_and_attentions_run_on_the_torch_engine_never_dropped(setup):
    runner, reference = setup
    items = [item(SEQUENCES[1]), item(SEQUENCES[3], [pb.INCLUDE_CONTACTS], ())]
    before = dict(runner.batches)
    outputs = run(runner, items)
    assert runner.batches == {**before, "torch": before["torch"] + 1}
    expected = fair_esm_outputs(reference, SEQUENCES[3])
    assert_close(outputs[(1, pb.INCLUDE_CONTACTS, 0)], expected["contacts"], what="contacts")
    assert (0, pb.INCLUDE_MEAN, 6) in outputs


def test_torch_works_on_one_thread_around_openvino_and_gets_its_threads_back(setup):
    """torch's OpenMP threads would spin beside OpenVINO's after each parallel region."""
    runner, _ = setup
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        seen = []
        runner.run([item(SEQUENCES[3])], lambda output: seen.append(torch.get_num_threads()))
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("count", [1, 3])
def test_long_batches_run_on_openvino_one_sequence_at_a_time(setup, count):
    """One sequence runs on all threads; of three, two share the streams and the third
    (the shortest) runs after them: every path gives fair-esm's outputs, in order."""
    runner, reference = setup
    long = "ACDEFGHIKLMNPQRSTVWY" * 30  # 600 residues
    sequences = [long, long[::-1][:550], long[:580]][:count]
    before = dict(runner.batches)
    outputs = run(runner, [item(s, [pb.INCLUDE_MEAN, pb.INCLUDE_LOGITS], (3,)) for s in sequences])
    assert runner.batches == {**before, "openvino": before["openvino"] + 1}
    for index, sequence in enumerate(sequences):
        expected = fair_esm_outputs(reference, sequence)
        assert_close(outputs[(index, pb.INCLUDE_MEAN, 3)], expected["mean"][3], what=f"{index}")
        assert_close(outputs[(index, pb.INCLUDE_LOGITS, 0)], expected["logits"], what=f"{index}")


def test_openvino_is_on_or_off():
    assert WorkerSettings().openvino == "on"
    assert WorkerSettings(openvino="off").openvino == "off"
    with pytest.raises(ValueError, match="openvino must be on or off, got 'auto'"):
        WorkerSettings(openvino="auto")


def test_a_bfloat16_engine_gets_an_openvino_runner_in_bfloat16(tiny_checkpoint):
    """A `--precision bf16` CPU worker: the runner converts from float32 weights and runs at
    OpenVINO's bf16 hint (f32 where the CPU has no bf16); outputs stay close to fair-esm."""
    checkpoint = load_checkpoint(tiny_checkpoint)
    engine = Engine(Esm2.from_checkpoint(checkpoint), "cpu", torch.bfloat16)
    runner = OpenVinoRunner.for_engine(engine, torch.bfloat16, threads=1)
    outputs = run(runner, [item("MKTAYIAKQRQISFVKSHFSRQ", {pb.INCLUDE_MEAN}, (6,))])
    expected = fair_esm_outputs(build_fair_esm_model(checkpoint), "MKTAYIAKQRQISFVKSHFSRQ")
    assert runner.batches["openvino"] == 1
    assert_close(outputs[(0, pb.INCLUDE_MEAN, 6)], expected["mean"][6], atol=0.1)
