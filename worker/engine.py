"""Turns a batch of work items into packed output tensors.

The engine owns one model on one device. It knows nothing of Redis: the queue loop
hands it items and an `emit` callback, and receives every output tensor as wire
bytes as soon as it exists (attention maps while the last layer still runs), so
no output is held longer than it must be.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from esm2_service.alphabet import MASK_INDEX
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.tensors import element_size, resolve_dtype
from esm2_service.worker.model import Esm2, ForwardPlan, PackedBatch
from esm2_service.worker.work import Emit, TensorOutput, WorkItem

EMBEDDING_KINDS = (pb.INCLUDE_MEAN, pb.INCLUDE_PER_TOKEN, pb.INCLUDE_BOS)


_TORCH_WIRE_DTYPE = {
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
}


def wire_bytes(tensor: torch.Tensor, dtype: int) -> bytes:
    """A tensor as little-endian C-order bytes of `dtype` (bfloat16 as raw bits)."""
    return _on_wire(tensor, dtype).cpu().numpy().tobytes()


def avoid_cudnn_attention() -> None:
    """Keeps scaled_dot_product_attention off cuDNN's backend, which torch 2.11 prefers on
    Hopper GPUs and which builds an execution plan for every new sequence length: on an
    H200 (fp16, 800 sequences of 496 lengths in batches of 8), a first pass over unseen
    lengths ran at 10,241 residues/s with it and 290,696 without it (warm passes 280,613
    and 348,155). The service sees new lengths all the time."""
    torch.backends.cuda.enable_cudnn_sdp(False)


class Engine:
    """Runs work items through one `Esm2` on one device."""

    def __init__(
        self, model: Esm2, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ):
        """`dtype` is the compute precision: float32, or float16/bfloat16 on GPUs (attention
        probabilities for contacts and attentions are always float32)."""
        self.device = torch.device(device)
        self.model = model.to(self.device).compute_in(dtype).eval()
        if self.device.type == "cpu":
            self.model.pack_for_cpu()
        if self.device.type == "cuda":
            avoid_cudnn_attention()

    def warm_up(self) -> None:
        """Runs every code path once, so the first request pays no start-up cost."""
        include = frozenset(EMBEDDING_KINDS + (pb.INCLUDE_CONTACTS, pb.INCLUDE_LOGITS))
        items = [
            WorkItem((0, 5, 6, 7, 2), include, (0, self.model.num_layers)),
            WorkItem((0, 32, 8, 2), frozenset(), predict=True),
        ]
        self.run(items, lambda output: None)

    @torch.inference_mode()
    def run(self, items: Sequence[WorkItem], emit: Emit) -> None:
        """Runs `items` as one packed batch; calls `emit` for every output tensor."""
        batch = PackedBatch.from_token_lists([item.token_ids for item in items], self.device)
        contacts = _ContactAccumulator(self.model, items)
        attentions = _AttentionEmitter(
            items, emit, self.model.attention_heads, self.model.num_layers
        )

        def observe(layer: int, sequence: int, first_head: int, probs: torch.Tensor) -> None:
            if pb.INCLUDE_CONTACTS in items[sequence].include:
                contacts.add(layer, sequence, first_head, probs)
            if layer == self.model.num_layers and pb.INCLUDE_ATTENTIONS in items[sequence].include:
                attentions.add(sequence, first_head, probs)

        plan = ForwardPlan(
            repr_layers=frozenset(layer for item in items for layer in embedding_layers(item)),
            attention_maps=self._attention_maps(items),
            attention_observer=observe,
        )
        final, hidden = self.model(batch, plan)
        self.emit_outputs(items, batch, final, hidden, emit)
        contacts.emit_all(emit)

    def emit_outputs(self, items, batch: PackedBatch, final, hidden, emit: Emit) -> None:
        """Embeddings and logits of `items` from a forward pass's packed hidden states
        (`final`: the last layer's, after the final norm; `hidden`: by layer)."""
        outputs = [
            output
            for index, item in enumerate(items)
            for output in self._embeddings(index, item, batch, hidden)
        ]
        outputs += self._logits(items, batch, final)
        ship(outputs, items, emit)

    def _attention_maps(self, items: Sequence[WorkItem]) -> dict[int, frozenset[int]]:
        last = self.model.num_layers
        maps: dict[int, set[int]] = {}
        for index, item in enumerate(items):
            if pb.INCLUDE_CONTACTS in item.include:
                for layer in range(1, last + 1):
                    maps.setdefault(layer, set()).add(index)
            if pb.INCLUDE_ATTENTIONS in item.include:
                maps.setdefault(last, set()).add(index)
        return {layer: frozenset(sequences) for layer, sequences in maps.items()}

    @staticmethod
    def _embeddings(index, item, batch, hidden) -> list[tuple[int, int, int, torch.Tensor]]:
        """(item, kind, layer, tensor) of `item`'s embeddings, on the model's device."""
        start, found = batch.offsets[index], []
        for layer in embedding_layers(item):
            states = hidden[layer]
            residues = states[start + 1 : start + 1 + item.residues]  # (L, E)
            tensors = {
                pb.INCLUDE_MEAN: lambda r=residues: r.mean(0),
                pb.INCLUDE_PER_TOKEN: lambda r=residues: r,
                pb.INCLUDE_BOS: lambda s=states: s[start],
            }
            for kind in EMBEDDING_KINDS:
                if kind in item.include:
                    found.append((index, kind, layer, tensors[kind]()))
        return found

    def _logits(self, items, batch, final) -> list[tuple[int, int, int, torch.Tensor]]:
        """One LM-head pass over every row any item needs, then sliced per item."""
        wanted = [(index, _logit_rows(item, batch, index)) for index, item in enumerate(items)]
        wanted = [(index, rows) for index, rows in wanted if rows is not None]
        if not wanted:
            return []
        logits = self.model.logits(final[torch.cat([rows for _, rows in wanted])])
        found, start = [], 0
        for index, rows in wanted:
            found.append((index, pb.INCLUDE_LOGITS, 0, logits[start : start + rows.numel()]))
            start += rows.numel()
        return found


def ship(outputs: list[tuple[int, int, int, torch.Tensor]], items, emit: Emit) -> None:
    """Emits each (item, kind, layer, tensor) as wire bytes. From a GPU, every tensor
    comes to the host in one copy (one synchronisation per batch, not one per output)."""
    wire = [_on_wire(tensor, items[index].dtype) for index, _, _, tensor in outputs]
    if outputs and outputs[0][3].is_cuda:
        data = bytes_in_one_copy(wire)
    else:
        data = [part.numpy().tobytes() for part in wire]
    for (index, kind, layer, tensor), payload in zip(outputs, data, strict=True):
        emit(TensorOutput(index, kind, layer, tuple(tensor.shape), payload))


def bytes_in_one_copy(parts: list[torch.Tensor]) -> list[bytes]:
    """Each flat uint8 tensor of `parts` as bytes, through one copy to the host."""
    host = memoryview(torch.cat(parts).cpu().numpy())
    bounds = itertools.accumulate((part.numel() for part in parts), initial=0)
    return [bytes(host[start:end]) for start, end in itertools.pairwise(bounds)]


def _on_wire(tensor: torch.Tensor, dtype: int) -> torch.Tensor:
    """A tensor's wire bytes as a flat uint8 tensor on its device."""
    converted = tensor.detach().to(_TORCH_WIRE_DTYPE[resolve_dtype(dtype)]).contiguous()
    return converted.view(-1).view(torch.uint8)


def embedding_layers(item: WorkItem) -> tuple[int, ...]:
    """The layers whose hidden states `item`'s embeddings need."""
    return item.repr_layers if item.include.intersection(EMBEDDING_KINDS) else ()


def _logit_rows(item: WorkItem, batch: PackedBatch, index: int) -> torch.Tensor | None:
    start = batch.offsets[index]
    if item.predict:
        tokens = batch.tokens[batch.rows(index)]
        return start + torch.nonzero(tokens == MASK_INDEX).flatten()
    if pb.INCLUDE_LOGITS in item.include:
        return torch.arange(start + 1, start + 1 + item.residues, device=batch.tokens.device)
    return None


class _ContactAccumulator:
    """fair-esm's contact head, accumulated one block of attention maps at a time.

    fair-esm stacks all layers x heads maps, symmetrises each, applies APC and a
    logistic regression over the stack. All of that is linear per map up to the
    sigmoid, so the weighted sum is built map by map and nothing is stacked:
    sum_h w_h * APC(A_h + A_h^T) = M + M^T - a^T diag(w / a12) a, with
    M = sum_h w_h A_h, a the row sums of each symmetrised map and a12 their totals.
    """

    def __init__(self, model: Esm2, items: Sequence[WorkItem]):
        self.weight = model.contact_weight  # (layers, heads)
        self.bias = model.contact_bias
        self.items = items
        self.sums: dict[int, torch.Tensor] = {}

    def add(self, layer: int, sequence: int, first_head: int, probs: torch.Tensor) -> None:
        residues = self.items[sequence].residues
        maps = probs[:, 1 : residues + 1, 1 : residues + 1]  # drop <cls>, <eos>: (h, L, L)
        weight = self.weight[layer - 1, first_head : first_head + maps.shape[0]].to(maps.dtype)
        weighted = torch.einsum("h,hij->ij", weight, maps)
        row_sums = maps.sum(-1) + maps.sum(-2)  # (h, L): rows of A + A^T
        totals = row_sums.sum(-1)  # (h,)
        correction = (row_sums * (weight / totals).unsqueeze(-1)).transpose(0, 1) @ row_sums
        update = weighted + weighted.transpose(0, 1) - correction
        if sequence in self.sums:
            self.sums[sequence] += update
        else:
            self.sums[sequence] = update

    def emit_all(self, emit: Emit) -> None:
        for sequence, total in sorted(self.sums.items()):
            contacts = torch.sigmoid(total + self.bias)
            data = wire_bytes(contacts, self.items[sequence].dtype)
            emit(TensorOutput(sequence, pb.INCLUDE_CONTACTS, 0, tuple(contacts.shape), data))
        self.sums.clear()


class _AttentionEmitter:
    """Streams last-layer attention maps out a block of heads at a time."""

    def __init__(self, items: Sequence[WorkItem], emit: Emit, heads: int, layer: int):
        self.items = items
        self.emit = emit
        self.heads = heads
        self.layer = layer

    def add(self, sequence: int, first_head: int, probs: torch.Tensor) -> None:
        item = self.items[sequence]
        residues = item.residues
        maps = probs[:, 1 : residues + 1, 1 : residues + 1]
        offset = first_head * residues * residues * element_size(item.dtype)
        shape = (self.heads, residues, residues)
        data = wire_bytes(maps, item.dtype)
        self.emit(TensorOutput(sequence, pb.INCLUDE_ATTENTIONS, self.layer, shape, data, offset))
