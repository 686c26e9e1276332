"""OpenVINO behind the worker's `Runner`: embeddings and logits, on CPUs.

OpenVINO compiles ESM-2 into fused CPU kernels (its bf16 ones use AVX512-BF16 far
better than torch's) that beat our torch engine at every length measured. Padding
would cost it the packed engine's advantage, so each sequence runs alone, unpadded,
and needs no attention mask; a batch's sequences are spread over single-threaded
streams, one per thread (docs/performance.md).

What it serves: batches asking for mean, per-token and BOS embeddings of any layers,
logits, or Predict. Contacts and attention maps need the attention probabilities,
which the compiled graph does not expose: a batch asking for either runs on the
torch engine whole, so nothing is ever dropped. The graph exported is
`SequenceEsm2`, the same arithmetic as `model.Esm2` (and fair-esm) on one sequence,
returning the hidden states of every layer; the LM head and the slicing stay in the
engine.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from esm2_service.alphabet import MASK_INDEX
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.worker.engine import Engine, embedding_layers
from esm2_service.worker.model import (
    _LAYER_NORM_EPS,
    _MASK_RATIO_TRAIN,
    Esm2,
    PackedBatch,
    _rotate_half,
)
from esm2_service.worker.work import Emit, WorkItem

log = logging.getLogger(__name__)

# Outputs that need attention probabilities: the torch engine's.
ATTENTION_KINDS = frozenset([pb.INCLUDE_CONTACTS, pb.INCLUDE_ATTENTIONS])
PRECISION_HINTS = {torch.float32: "f32", torch.bfloat16: "bf16"}


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class SequenceEsm2(nn.Module):
    """`Esm2` over one sequence, for export: ids (1, T) => hidden states
    (layers + 1, T, E), the last after the final layer norm as fair-esm's. One
    sequence needs no padding, so attention needs no mask."""

    def __init__(self, model: Esm2):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.embed_tokens(ids[0])  # (T, E)
        if m.token_dropout:
            is_mask = (ids[0] == MASK_INDEX).to(torch.float32)
            x = x * (1.0 - is_mask).unsqueeze(-1)
            x = x * ((1 - _MASK_RATIO_TRAIN) / (1 - is_mask.mean()))
        positions = torch.arange(ids.shape[1], dtype=torch.float32)
        freqs = torch.outer(positions, m.rotary.inv_freq)
        table = torch.cat((freqs, freqs), dim=-1)
        cos, sin = table.cos()[:, None, :], table.sin()[:, None, :]  # (T, 1, D)
        states = [x]
        for layer in m.layers:
            x = _sequence_layer(layer, x, cos, sin)
            states.append(x)
        states[-1] = m.final_norm(x)
        return torch.stack(states)


def _sequence_layer(layer, x, cos, sin):
    t, e = x.shape
    h = F.layer_norm(
        x, (e,), layer.attention_norm.weight, layer.attention_norm.bias, _LAYER_NORM_EPS
    )
    qkv = F.linear(h, layer.qkv.weight, layer.qkv.bias).view(t, 3, layer.heads, layer.head_dim)
    q, k, v = qkv.unbind(1)  # (T, H, D) each
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    context = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=layer.scaling
    )  # (H, T, D)
    x = x + layer.out_proj(context.transpose(0, 1).reshape(t, e))
    h = F.layer_norm(x, (e,), layer.ffn_norm.weight, layer.ffn_norm.bias, _LAYER_NORM_EPS)
    return x + layer.fc2(F.gelu(layer.fc1(h)))


def convert(model: Esm2):
    """`model` as an OpenVINO model (`SequenceEsm2`'s graph), not yet compiled."""
    import openvino as ov

    example = torch.tensor([[0, 5, 6, 32, 7, 2]])
    # OpenVINO converts float32 weights and computes in `dtype` itself: a bfloat16 engine's
    # model is traced from a float32 copy (tracing it as is mixes float32 and bfloat16).
    if any(tensor.dtype != torch.float32 for tensor in model.state_dict().values()):
        model = model.float32_copy()
    # Tracing warns where Python reads a size (embedding's padding check); the graph
    # still takes any batch and length, which the tests check against fair-esm.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return ov.convert_model(SequenceEsm2(model).eval(), example_input=example)


def compile_for_cpu(converted, dtype: torch.dtype, threads: int, streams: int = 1):
    """`converted` compiled for this CPU in `dtype`: `streams` independent streams
    sharing `threads` threads."""
    import openvino as ov

    config = {
        "INFERENCE_PRECISION_HINT": PRECISION_HINTS[dtype],
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": streams,
    }
    return ov.Core().compile_model(converted, "CPU", config)


class OpenVinoRunner:
    """A `Runner`: OpenVINO for batches it can serve, the torch engine for the rest.

    Every sequence runs alone, so no product or attention runs on padding (the packed
    engine's advantage, kept). A batch of one sequence runs on all threads; a larger one
    is spread over one single-threaded stream per thread, longest sequences first, which
    measured 1.2 to 1.5x faster than all threads on one sequence at a time
    (docs/performance.md).
    """

    def __init__(self, engine: Engine, latency_model, parallel_model):
        import openvino as ov

        self.engine = engine
        self.single = latency_model.create_infer_request()
        self.streams = parallel_model.get_property("NUM_STREAMS") if parallel_model else 1
        self.parallel = (
            ov.AsyncInferQueue(parallel_model, self.streams) if self.streams > 1 else None
        )
        self.batches = {"openvino": 0, "torch": 0}

    @classmethod
    def for_engine(cls, engine: Engine, dtype: torch.dtype, threads: int) -> OpenVinoRunner:
        started = time.perf_counter()
        converted = convert(engine.model)
        latency = compile_for_cpu(converted, dtype, threads)
        parallel = (
            compile_for_cpu(converted, dtype, threads, streams=threads) if threads > 1 else None
        )
        log.info("OpenVINO compiled the model in %.1f s", time.perf_counter() - started)
        return cls(engine, latency, parallel)

    def warm_up(self) -> None:
        self.engine.warm_up()
        items = [WorkItem((0, 5, 6, 7, 2), frozenset([pb.INCLUDE_MEAN]), (0,))]
        self.run(items, lambda output: None)
        self.run(items * 2, lambda output: None)

    def serves(self, items: Sequence[WorkItem]) -> bool:
        """Batches without contacts or attentions."""
        return not any(item.include & ATTENTION_KINDS for item in items if not item.predict)

    @torch.inference_mode()
    def run(self, items: Sequence[WorkItem], emit: Emit) -> None:
        if not self.serves(items):
            self.batches["torch"] += 1
            self.engine.run(items, emit)
            return
        self.batches["openvino"] += 1
        layers = self._layers_needed(items)
        states = self._infer_each([item.token_ids for item in items], layers)
        with _one_torch_thread():
            batch = PackedBatch.from_token_lists([item.token_ids for item in items])
            # (layers, tokens, E) per sequence => packed (tokens, E) per layer
            packed = states[0] if len(states) == 1 else np.concatenate(states, 1)
            hidden = dict(zip(layers, torch.from_numpy(packed), strict=True))
            final = hidden.get(self.engine.model.num_layers)
            self.engine.emit_outputs(items, batch, final, hidden, emit)

    def _layers_needed(self, items: Sequence[WorkItem]) -> list[int]:
        layers = {layer for item in items for layer in embedding_layers(item)}
        if any(item.predict or pb.INCLUDE_LOGITS in item.include for item in items):
            layers.add(self.engine.model.num_layers)
        return sorted(layers)

    def _infer_each(self, token_lists: list[tuple[int, ...]], layers: list[int]) -> list:
        """The hidden states of `layers` for each sequence alone: (layers, tokens, E) each.

        Longest first, one per stream; the sequences left over once every stream has had
        an equal share (the shortest) run after them on all threads, so no thread idles
        through a whole sequence."""
        inputs = [_unpadded_input(tokens) for tokens in token_lists]
        states: list = [None] * len(inputs)
        order = sorted(range(len(inputs)), key=lambda i: -len(token_lists[i]))
        shared = len(order) - len(order) % self.streams if self.parallel else 0
        if shared:

            def keep(request, index: int) -> None:
                states[index] = request.get_output_tensor(0).data[layers]  # a copy

            self.parallel.set_callback(keep)
            for index in order[:shared]:
                self.parallel.start_async(inputs[index], index)
            self.parallel.wait_all()
        for index in order[shared:]:
            # The shared output buffer is reused by the next call: `[layers]` copies it.
            states[index] = self.single.infer(inputs[index], share_outputs=True)[0][layers]
        return states


@contextlib.contextmanager
def _one_torch_thread():
    """torch on one thread for the slicing, means and conversions around OpenVINO's
    work. On more, torch's OpenMP threads keep spinning for milliseconds after each
    parallel region (`worker.openmp`), on the cores OpenVINO's threads need next: a
    100-residue request right after a long sequence took 18 ms instead of 12 to 15."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _unpadded_input(tokens: tuple[int, ...]) -> list[np.ndarray]:
    return [np.array([tokens], dtype=np.int64)]
