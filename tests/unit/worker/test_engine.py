"""Our packed ESM-2 forward against fair-esm's ESM2.forward, run alone per sequence."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from support import assert_close, fair_esm_outputs, read_fasta_records

from esm2_service.alphabet import token_ids
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.tensors import TensorAssembler, chunk_messages
from esm2_service.worker import model as model_module
from esm2_service.worker.checkpoint import build_fair_esm_model, load_checkpoint
from esm2_service.worker.engine import Engine
from esm2_service.worker.model import Esm2
from esm2_service.worker.work import WorkItem

ALL_KINDS = frozenset(
    [
        pb.INCLUDE_MEAN,
        pb.INCLUDE_PER_TOKEN,
        pb.INCLUDE_BOS,
        pb.INCLUDE_CONTACTS,
        pb.INCLUDE_LOGITS,
        pb.INCLUDE_ATTENTIONS,
    ]
)
ALL_LAYERS = (0, 1, 2, 3, 4, 5, 6)
NAMES = {
    pb.INCLUDE_MEAN: "mean",
    pb.INCLUDE_PER_TOKEN: "per_token",
    pb.INCLUDE_BOS: "bos",
    pb.INCLUDE_CONTACTS: "contacts",
    pb.INCLUDE_LOGITS: "logits",
    pb.INCLUDE_ATTENTIONS: "attentions",
}


def work_item(
    sequence, include=ALL_KINDS, layers=ALL_LAYERS, dtype=pb.DTYPE_FLOAT32, predict=False
):
    tokens = token_ids(sequence)
    return WorkItem(tokens, frozenset(include), tuple(layers), dtype, predict)


def run(engine, items) -> dict:
    """Runs the engine and reassembles every emitted tensor through the wire codec."""
    assemblers: dict = {}
    emitted = []

    def emit(output):
        emitted.append((output.item, output.kind, output.layer))
        dtype = items[output.item].dtype
        key = (output.item, output.kind, output.layer)
        assembler = assemblers.setdefault(key, TensorAssembler(dtype, output.shape))
        for chunk in chunk_messages(
            output.kind, output.layer, output.shape, dtype, output.data, output.offset
        ):
            assembler.add(chunk)

    engine.run(items, emit)
    return {key: assembler.array() for key, assembler in assemblers.items()}, emitted


def expected_for(reference, sequence, key_kind, layer):
    name = NAMES[key_kind]
    return reference[name][layer] if name in ("mean", "per_token", "bos") else reference[name]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint)
    return Engine(Esm2.from_checkpoint(loaded)), build_fair_esm_model(loaded)


@pytest.fixture(scope="module")
def full(full_checkpoint):
    loaded = load_checkpoint(full_checkpoint)
    return Engine(Esm2.from_checkpoint(loaded)), build_fair_esm_model(loaded)


MIXED = ["M", "MKTAYIAKQRQISFVKSHFSRQ", "ACDEFGHIKLMNPQRSTVWYXBUZO-", "GSHM" * 40, "W" * 3]


def test_every_output_matches_fair_esm_when_batched_with_other_lengths(tiny):
    engine, reference = tiny
    outputs, _ = run(engine, [work_item(s) for s in MIXED])
    for index, sequence in enumerate(MIXED):
        expected = fair_esm_outputs(reference, sequence)
        for (item, kind, layer), actual in outputs.items():
            if item == index:
                assert_close(
                    actual,
                    expected_for(expected, sequence, kind, layer),
                    what=f"{sequence[:8]} {NAMES[kind]} L{layer}",
                )
    count_per_item = 3 * len(ALL_LAYERS) + 3
    assert len(outputs) == len(MIXED) * count_per_item


def test_full_size_model_on_real_proteins_matches_fair_esm(full):
    engine, reference = full
    sequences = [sequence for _, sequence in read_fasta_records("few_proteins.fasta")]
    layers = (0, 3, 6)
    outputs, _ = run(engine, [work_item(s, layers=layers) for s in sequences])
    for index, sequence in enumerate(sequences):
        expected = fair_esm_outputs(reference, sequence, layers)
        for (item, kind, layer), actual in outputs.items():
            if item == index:
                assert_close(
                    actual,
                    expected_for(expected, sequence, kind, layer),
                    what=f"{NAMES[kind]} L{layer}",
                )
    assert outputs[(0, pb.INCLUDE_ATTENTIONS, 6)].shape == (
        20,
        len(sequences[0]),
        len(sequences[0]),
    )
    assert outputs[(1, pb.INCLUDE_CONTACTS, 0)].shape == (len(sequences[1]),) * 2


def test_predict_returns_logits_at_the_masks_in_order(tiny):
    engine, reference = tiny
    sequences = ["MK<mask>AY<mask>", "<mask>", "ACD<mask>FGHI<mask><mask>KL"]
    outputs, _ = run(engine, [work_item(s, include=(), layers=(), predict=True) for s in sequences])
    assert len(outputs) == 3
    for index, sequence in enumerate(sequences):
        actual = outputs[(index, pb.INCLUDE_LOGITS, 0)]
        expected = fair_esm_outputs(reference, sequence)["mask_logits"]
        assert actual.shape == (sequence.count("<mask>"), 33)
        assert_close(actual, expected, what=sequence)


def test_attention_maps_are_processed_in_head_blocks_with_the_same_result(tiny, monkeypatch):
    engine, reference = tiny
    sequence = "MKTAYIAKQRQISFVKSHFSRQ" * 3
    monkeypatch.setattr(
        model_module, "_MAX_ATTENTION_BLOCK_BYTES", 4 * 70 * 70
    )  # one head at a time
    outputs, _ = run(
        engine,
        [work_item(sequence, include=[pb.INCLUDE_CONTACTS, pb.INCLUDE_ATTENTIONS], layers=())],
    )
    expected = fair_esm_outputs(reference, sequence)
    assert_close(outputs[(0, pb.INCLUDE_CONTACTS, 0)], expected["contacts"])
    assert_close(outputs[(0, pb.INCLUDE_ATTENTIONS, 6)], expected["attentions"])


@pytest.mark.parametrize("dtype, atol", [(pb.DTYPE_FLOAT16, 2e-2), (pb.DTYPE_BFLOAT16, 1e-1)])
def test_half_precision_outputs_are_rounded_fp32_outputs(tiny, dtype, atol):
    engine, _ = tiny
    item32 = work_item(MIXED[1])
    outputs32, _ = run(engine, [item32])
    outputs16, _ = run(engine, [work_item(MIXED[1], dtype=dtype)])
    assert outputs16.keys() == outputs32.keys()
    for key, value in outputs32.items():
        low = outputs16[key].astype(np.float32)
        assert np.allclose(low, value, rtol=1e-2, atol=atol), key


def test_only_what_was_asked_is_computed(tiny, monkeypatch):
    engine, _ = tiny
    calls = {"lm_head": 0, "maps": 0}
    hook = engine.model.lm_head.register_forward_hook(
        lambda *_: calls.__setitem__("lm_head", calls["lm_head"] + 1)
    )
    original = model_module.EncoderLayer._attention_with_maps

    def counting(self, *args):
        calls["maps"] += 1
        return original(self, *args)

    monkeypatch.setattr(model_module.EncoderLayer, "_attention_with_maps", counting)
    try:
        outputs, emitted = run(
            engine, [work_item("MKTAYIAK", include=[pb.INCLUDE_MEAN], layers=(2,))]
        )
        assert calls == {"lm_head": 0, "maps": 0}
        assert emitted == [(0, pb.INCLUDE_MEAN, 2)]
        run(engine, [work_item("MKTAYIAK", include=[pb.INCLUDE_ATTENTIONS], layers=())])
        assert calls == {"lm_head": 0, "maps": 1}  # the last layer only
        run(engine, [work_item("MKTAYIAK", include=[pb.INCLUDE_LOGITS], layers=())])
        assert calls == {"lm_head": 1, "maps": 1}
    finally:
        hook.remove()


def test_hidden_states_are_not_kept_for_unrequested_layers(tiny):
    engine, _ = tiny
    batch = model_module.PackedBatch.from_token_lists([list(token_ids("MKV"))])
    with torch.inference_mode():
        _, hidden = engine.model(batch, model_module.ForwardPlan(repr_layers=frozenset({0, 4})))
    assert sorted(hidden) == [0, 4]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_cpu_engines_run_their_float32_products_on_prepacked_onednn_weights(full):
    engine, _ = full
    linears = [m for m in engine.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(hasattr(m, "onednn_weight") for m in linears)
    fc1 = engine.model.layers[0].fc1
    x = torch.randn(37, fc1.in_features)
    with torch.inference_mode():
        packed = model_module.linear(x, fc1, gelu=True)
        plain = torch.nn.functional.gelu(torch.nn.functional.linear(x, fc1.weight, fc1.bias))
    assert packed.shape == plain.shape
    torch.testing.assert_close(packed, plain, rtol=0, atol=1e-5)


def test_half_precision_products_are_not_packed(tiny_checkpoint):
    model = Esm2.from_checkpoint(load_checkpoint(tiny_checkpoint))
    engine = Engine(model, "cpu", torch.bfloat16)
    layer = engine.model.layers[0]
    assert not hasattr(layer.fc1, "onednn_weight")  # bf16: plain F.linear in bf16
    assert hasattr(layer.qkv, "onednn_weight") or not torch.backends.mkldnn.is_available()


def test_cuda_engines_keep_attention_off_cudnn():
    # cuDNN builds a plan per new length (27x slower first passes on an H200); the CUDA
    # engine turns it off. The switch is process-wide, so it is restored afterwards.
    from esm2_service.worker.engine import avoid_cudnn_attention

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        avoid_cudnn_attention()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def segment_attention(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k):
    """What FlashAttention's variable-length kernel computes, per segment, on a CPU."""
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k)
    bounds = cu_seq_q.tolist()
    segments = list(itertools.pairwise(bounds))
    assert max_q == max_k == max(end - start for start, end in segments)
    assert bounds[-1] == q.shape[0] and q.dtype == k.dtype == v.dtype
    out = torch.empty_like(q)
    for start, end in segments:
        heads_first = (t[start:end].transpose(0, 1) for t in (q, k, v))
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(*heads_first).transpose(
            0, 1
        )
    return out


def test_packed_attention_is_one_call_per_layer_and_matches_per_sequence(
    tiny_checkpoint, monkeypatch
):
    """On a GPU in half precision, each layer attends the whole batch in one
    variable-length call. The CUDA kernel cannot run here: a CPU one computing the same
    stands in for it, so what is checked is the packing (bounds, longest length, dtype)
    and the maps' path beside it, against the per-sequence engine in the same precision."""
    loaded = load_checkpoint(tiny_checkpoint)
    engine = Engine(Esm2.from_checkpoint(loaded), "cpu", torch.bfloat16)
    items = [work_item(s, dtype=pb.DTYPE_FLOAT32) for s in MIXED]
    items[2] = work_item(MIXED[2], include=[pb.INCLUDE_CONTACTS, pb.INCLUDE_MEAN], layers=(6,))
    per_sequence, _ = run(engine, items)
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return segment_attention(*args)

    monkeypatch.setattr(model_module, "varlen_attn", counted)
    monkeypatch.setattr(model_module, "can_pack_attention", lambda q, dtype: True)
    packed, _ = run(engine, items)
    tokens = sum(len(item.token_ids) for item in items)
    model = engine.model
    head_dim = model.embed_dim // model.attention_heads
    assert calls == [(tokens, model.attention_heads, head_dim)] * model.num_layers
    assert packed.keys() == per_sequence.keys()
    for key, value in per_sequence.items():
        np.testing.assert_allclose(packed[key], value, rtol=0, atol=1e-2, err_msg=str(key))


def test_a_batch_of_outputs_comes_to_the_host_in_one_copy_with_each_output_intact():
    """What a GPU engine does with a batch's outputs (here on CPU tensors): one
    concatenation, one copy, then each output's bytes sliced back out."""
    from esm2_service.worker.engine import _on_wire, bytes_in_one_copy, wire_bytes

    tensors = [
        (torch.randn(320), pb.DTYPE_FLOAT32),
        (torch.randn(7, 320), pb.DTYPE_FLOAT16),
        (torch.randn(5, 33), pb.DTYPE_BFLOAT16),
        (torch.randn(0, 320), pb.DTYPE_FLOAT32),
    ]
    parts = [_on_wire(tensor, dtype) for tensor, dtype in tensors]
    copied = bytes_in_one_copy(parts)
    assert copied == [wire_bytes(tensor, dtype) for tensor, dtype in tensors]
    assert copied[1] == tensors[1][0].numpy().astype("<f2").tobytes()
    assert len(copied[2]) == 5 * 33 * 2 and copied[3] == b""
