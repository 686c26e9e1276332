"""OpenVINO behind the worker's `Runner`: embeddings and logits, on CPUs.

OpenVINO compiles ESM-2 into fused CPU kernels that beat our torch engine's per-op
dispatch on short batches, back to back and more so after a pause (README,
Performance). It cannot skip padding, as our packed engine does, so a batch is cut
into groups of similar length first (at most `MAX_PADDING` extra tokens).

What it serves: batches of at most `--openvino-max-tokens` tokens (long batches
run faster on the packed engine, which skips padding) asking for mean, per-token
and BOS embeddings of any layers, logits, or Predict. Contacts and attention maps
need the attention probabilities, which the compiled graph does not expose: a
batch asking for either runs on the torch engine whole, so nothing is ever
dropped. The graph exported is `PaddedEsm2`, the same arithmetic as `model.Esm2`
(and fair-esm) on a padded batch, returning the hidden states of every layer; the
LM head and the slicing stay in the engine.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from esm2_service.alphabet import MASK_INDEX, PAD_INDEX
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

# Padded tokens a group may add, as a share of its real tokens.
MAX_PADDING = 0.15
# Outputs that need attention probabilities: the torch engine's.
ATTENTION_KINDS = frozenset([pb.INCLUDE_CONTACTS, pb.INCLUDE_ATTENTIONS])
PRECISION_HINTS = {torch.float32: "f32", torch.bfloat16: "bf16"}


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class PaddedEsm2(nn.Module):
    """`Esm2` over a padded batch, for export: (ids, mask) of shape (B, T) => hidden
    states (layers + 1, B, T, E), the last after the final layer norm as fair-esm's."""

    def __init__(self, model: Esm2):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = self.model
        real = mask.to(torch.float32)
        x = m.embed_tokens(ids)
        if m.token_dropout:
            is_mask = (ids == MASK_INDEX).to(torch.float32)
            x = x * (1.0 - is_mask).unsqueeze(-1)
            observed = is_mask.sum(-1) / real.sum(-1)
            x = x * ((1 - _MASK_RATIO_TRAIN) / (1 - observed))[:, None, None]
        x = x * real.unsqueeze(-1)  # fair-esm zeroes padded rows
        positions = torch.arange(ids.shape[1], dtype=torch.float32)
        freqs = torch.outer(positions, m.rotary.inv_freq)
        table = torch.cat((freqs, freqs), dim=-1)
        cos, sin = table.cos()[None, :, None, :], table.sin()[None, :, None, :]
        # Keys that are padding get -inf before the softmax: (B, 1, 1, T).
        bias = ((1.0 - real) * torch.finfo(torch.float32).min)[:, None, None, :]
        states = [x]
        for layer in m.layers:
            x = _padded_layer(layer, x, cos, sin, bias)
            states.append(x)
        states[-1] = m.final_norm(x)
        return torch.stack(states)


def _padded_layer(layer, x, cos, sin, bias):
    b, t, e = x.shape
    h = F.layer_norm(
        x, (e,), layer.attention_norm.weight, layer.attention_norm.bias, _LAYER_NORM_EPS
    )
    qkv = F.linear(h, layer.qkv.weight, layer.qkv.bias).view(b, t, 3, layer.heads, layer.head_dim)
    q, k, v = qkv.unbind(2)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    context = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, scale=layer.scaling
    )
    x = x + layer.out_proj(context.transpose(1, 2).reshape(b, t, e))
    h = F.layer_norm(x, (e,), layer.ffn_norm.weight, layer.ffn_norm.bias, _LAYER_NORM_EPS)
    return x + layer.fc2(F.gelu(layer.fc1(h)))


def compile_for_cpu(model: Esm2, dtype: torch.dtype, threads: int):
    """`model` converted by OpenVINO and compiled for this CPU in `dtype`."""
    import openvino as ov

    example = (
        torch.tensor([[0, 5, 6, 7, 2], [0, 5, 2, 1, 1]]),
        torch.tensor([[1] * 5, [1] * 3 + [0] * 2]),
    )
    started = time.perf_counter()
    # OpenVINO converts float32 weights and computes in `dtype` itself: a bfloat16 engine's
    # model is traced from a float32 copy (tracing it as is mixes float32 and bfloat16).
    if any(tensor.dtype != torch.float32 for tensor in model.state_dict().values()):
        model = model.float32_copy()
    # Tracing warns where Python reads a size (embedding's padding check); the graph
    # still takes any batch and length, which the tests check against fair-esm.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        converted = ov.convert_model(PaddedEsm2(model).eval(), example_input=example)
    config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[dtype], "INFERENCE_NUM_THREADS": threads}
    compiled = ov.Core().compile_model(converted, "CPU", config)
    log.info("OpenVINO compiled the model in %.1f s", time.perf_counter() - started)
    return compiled


def length_groups(lengths: Sequence[int], max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Indices of `lengths` in groups of similar length: sorted, each group as long as
    padding every member to its longest adds at most `max_padding` of its tokens."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    for index in order:
        group = groups[-1] if groups else None
        if group is not None:
            total = sum(lengths[i] for i in group) + lengths[index]
            if (len(group) + 1) * lengths[index] <= (1 + max_padding) * total:
                group.append(index)
                continue
        groups.append([index])
    return groups


class OpenVinoRunner:
    """A `Runner`: OpenVINO for batches it can serve, the torch engine for the rest."""

    def __init__(self, engine: Engine, compiled, max_tokens: int):
        self.engine = engine
        self.request = compiled.create_infer_request()
        self.max_tokens = max_tokens
        self.batches = {"openvino": 0, "torch": 0}

    @classmethod
    def for_engine(
        cls, engine: Engine, dtype: torch.dtype, threads: int, max_tokens: int
    ) -> OpenVinoRunner:
        return cls(engine, compile_for_cpu(engine.model, dtype, threads), max_tokens)

    def warm_up(self) -> None:
        self.engine.warm_up()
        items = [WorkItem((0, 5, 6, 7, 2), frozenset([pb.INCLUDE_MEAN]), (0,))]
        self.run(items, lambda output: None)

    def serves(self, items: Sequence[WorkItem]) -> bool:
        """Short batches without contacts or attentions: long ones run faster packed."""
        if sum(len(item.token_ids) for item in items) > self.max_tokens:
            return False
        return not any(item.include & ATTENTION_KINDS for item in items if not item.predict)

    @torch.inference_mode()
    def run(self, items: Sequence[WorkItem], emit: Emit) -> None:
        if not self.serves(items):
            self.batches["torch"] += 1
            self.engine.run(items, emit)
            return
        self.batches["openvino"] += 1
        batch = PackedBatch.from_token_lists([item.token_ids for item in items])
        layers = self._layers_needed(items)
        rows: dict[int, list[np.ndarray | None]] = {layer: [None] * len(items) for layer in layers}
        for group in length_groups(batch.lengths):
            states = self._infer([items[i].token_ids for i in group])
            for position, index in enumerate(group):
                for layer in layers:
                    rows[layer][index] = states[layer, position, : batch.lengths[index]]
        hidden = {layer: torch.from_numpy(np.concatenate(rows[layer])) for layer in layers}
        final = hidden.get(self.engine.model.num_layers)
        self.engine.emit_outputs(items, batch, final, hidden, emit)

    def _layers_needed(self, items: Sequence[WorkItem]) -> list[int]:
        layers = {layer for item in items for layer in embedding_layers(item)}
        if any(item.predict or pb.INCLUDE_LOGITS in item.include for item in items):
            layers.add(self.engine.model.num_layers)
        return sorted(layers)

    def _infer(self, token_lists: list[tuple[int, ...]]) -> np.ndarray:
        width = max(len(tokens) for tokens in token_lists)
        ids = np.full((len(token_lists), width), PAD_INDEX, dtype=np.int64)
        mask = np.zeros((len(token_lists), width), dtype=np.int64)
        for row, tokens in enumerate(token_lists):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return self.request.infer([ids, mask])[0]
