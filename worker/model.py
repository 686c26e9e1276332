"""ESM-2's forward pass over packed variable-length batches.

The same computation as fair-esm's `ESM2.forward` (rotary attention, token-dropout
scaling, pre-norm layers, final layer norm), arranged for serving:

- Sequences are packed end to end, `(N, E)` with N the total token count, so no
  work is spent on padding: every matrix product runs over real tokens only. On a
  GPU in half precision, attention over the whole batch is one variable-length
  flash-attention call per layer (`torch.nn.attention.varlen`), with no per-shape
  set-up; elsewhere it runs per sequence.
- Attention uses fused scaled-dot-product attention unless a caller needs the
  maps; then they are computed a few heads at a time and handed to an observer,
  so memory stays bounded at any length.
- Only the requested hidden states are kept, and the LM head runs only on the
  rows asked for.
- Half precision (`Esm2.compute_in`) is mixed: attention and the output and
  feed-forward products run in float16 or bfloat16, while the residual stream,
  embeddings, layer norms, the q/k/v projection and the LM head stay float32, so
  rounding does not accumulate across layers and attention maps (outputs) come
  from float32 q and k. Within 4e-3 of float32 in bfloat16, against 2e-2 all-bf16.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

try:  # torch 2.10 and later; FlashAttention 2 kernels, CUDA only
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None

from esm2_service.alphabet import MASK_INDEX, PAD_INDEX, VOCAB_TOKENS
from esm2_service.worker.checkpoint import Checkpoint

# fair-esm's token dropout: training masked 15% x 80% of tokens; at inference the
# embedding is rescaled by how many tokens this sequence actually masks.
_MASK_RATIO_TRAIN = 0.15 * 0.8
# Bounds the memory of one explicit attention block (heads x T x T fp32 scores).
_MAX_ATTENTION_BLOCK_BYTES = 64 * 1024 * 1024
_LAYER_NORM_EPS = 1e-5

# observer(layer, sequence, first_head, probs (heads, T, T)); layer counts from 1.
AttentionObserver = Callable[[int, int, int, torch.Tensor], None]


@dataclass
class PackedBatch:
    """Token ids of several sequences laid end to end."""

    tokens: torch.Tensor  # (N,) long, each sequence as <cls> ... <eos>
    lengths: list[int]  # tokens per sequence, <cls> and <eos> included
    offsets: list[int] = field(init=False)  # first row of each sequence

    def __post_init__(self) -> None:
        self.offsets = [0]
        for length in self.lengths[:-1]:
            self.offsets.append(self.offsets[-1] + length)

    # Computed on first use: the OpenVINO runner slices outputs by `offsets` only, and
    # these few small tensor ops are a visible share of a short request's latency.
    @cached_property
    def sequence_ids(self) -> torch.Tensor:
        """(N,) which sequence each row belongs to."""
        device = self.tokens.device
        lengths = torch.tensor(self.lengths, device=device)
        sequences = torch.arange(len(self.lengths), device=device)
        # output_size: without it, a GPU waits for the queued work to learn the total
        return torch.repeat_interleave(sequences, lengths, output_size=self.tokens.numel())

    @cached_property
    def positions(self) -> torch.Tensor:
        """(N,) each row's position within its sequence."""
        starts = torch.tensor(self.offsets, device=self.tokens.device)
        return (
            torch.arange(self.tokens.numel(), device=self.tokens.device) - starts[self.sequence_ids]
        )

    @classmethod
    def from_token_lists(
        cls, token_lists: Sequence[Sequence[int]], device: torch.device | str = "cpu"
    ):
        flat = [token for tokens in token_lists for token in tokens]
        tokens = torch.tensor(flat, dtype=torch.long, device=device)
        return cls(tokens=tokens, lengths=[len(tokens) for tokens in token_lists])

    @cached_property
    def cumulative_lengths(self) -> torch.Tensor:
        """(sequences + 1,) int32: where each sequence starts, then the total (cu_seqlens)."""
        bounds = [*self.offsets, self.tokens.numel()]
        return torch.tensor(bounds, dtype=torch.int32, device=self.tokens.device)

    def rows(self, sequence: int) -> slice:
        start = self.offsets[sequence]
        return slice(start, start + self.lengths[sequence])


@dataclass(frozen=True)
class ForwardPlan:
    """What one forward pass must produce."""

    repr_layers: frozenset[int] = frozenset()  # 0 (embeddings) .. num_layers (final, normed)
    # Sequences whose attention maps the observer receives, per layer (1-based).
    attention_maps: dict[int, frozenset[int]] = field(default_factory=dict)
    attention_observer: AttentionObserver | None = None


class RotaryTable:
    """cos/sin tables of fair-esm's RotaryEmbedding, looked up by position.

    Computed in float32 whatever the model's precision, then cast, as fair-esm does."""

    def __init__(self, head_dim: int):
        self.inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def lookup(self, positions: torch.Tensor, max_length: int, dtype: torch.dtype):
        """(N,) positions => cos, sin of shape (N, 1, D), broadcast over heads."""
        key = (positions.device, dtype)
        cos, sin = self._tables.get(key, (None, None))
        if cos is None or cos.shape[0] < max_length:
            t = torch.arange(max(max_length, 1024), device=positions.device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(positions.device))
            table = torch.cat((freqs, freqs), dim=-1)
            cos, sin = table.cos().to(dtype), table.sin().to(dtype)
            self._tables[key] = (cos, sin)
        return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def linear(x: torch.Tensor, layer: nn.Linear, gelu: bool = False) -> torch.Tensor:
    """`layer(x)`, then GELU if asked: through the oneDNN weights `Esm2.pack_for_cpu`
    prepared (GELU fused), else plain `F.linear`."""
    packed = getattr(layer, "onednn_weight", None)
    if packed is not None and x.dtype == packed.dtype:
        return torch.ops.mkldnn._linear_pointwise(
            x, packed, layer.bias, "gelu" if gelu else "none", [], "none" if gelu else ""
        )
    y = F.linear(x, layer.weight, layer.bias)
    return F.gelu(y) if gelu else y


def attention_inputs(x, norm: nn.LayerNorm, qkv: nn.Linear, cos, sin, heads: int):
    """Layer norm, the fused q/k/v projection and rotary embeddings:
    (N, E) => q, k, v each (N, H, D) in the projection's dtype, v with unit stride per
    token for fused attention."""
    n, e = x.shape
    h = F.layer_norm(x, (e,), norm.weight, norm.bias, _LAYER_NORM_EPS)
    projected = linear(h, qkv).view(n, 3, heads, e // heads)
    q = projected[:, 0] * cos + _rotate_half(projected[:, 0]) * sin
    k = projected[:, 1] * cos + _rotate_half(projected[:, 1]) * sin
    return q, k, projected[:, 2].contiguous()


def feed_forward(x, context, out: nn.Linear, norm: nn.LayerNorm, fc1: nn.Linear, fc2: nn.Linear):
    """Attention output projection and residual, then the pre-norm GELU MLP and residual.
    The residual stream keeps x's dtype; the products run in the weights' dtype."""
    x = x + linear(context, out).to(x.dtype)
    h = F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, _LAYER_NORM_EPS)
    h = linear(h.to(fc1.weight.dtype), fc1, gelu=True)
    return x + linear(h, fc2).to(x.dtype)


class EncoderLayer(nn.Module):
    """One pre-norm transformer layer; q, k and v projections fused in one matrix."""

    def __init__(self, embed_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = embed_dim // heads
        self.scaling = self.head_dim**-0.5
        self.attention_norm = nn.LayerNorm(embed_dim, eps=_LAYER_NORM_EPS)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.ffn_norm = nn.LayerNorm(embed_dim, eps=_LAYER_NORM_EPS)
        self.fc1 = nn.Linear(embed_dim, 4 * embed_dim)
        self.fc2 = nn.Linear(4 * embed_dim, embed_dim)

    def forward(self, x, batch, rotary, map_sequences, on_maps):
        n, e = x.shape
        q, k, v = attention_inputs(x, self.attention_norm, self.qkv, *rotary, self.heads)
        dtype = self.out_proj.weight.dtype  # the compute precision
        context = packed_attention(q, k, v, batch, dtype)
        if context is None:
            context = torch.empty((n, self.heads, self.head_dim), dtype=dtype, device=x.device)
            for sequence in range(len(batch.lengths)):
                if sequence not in map_sequences:
                    rows = batch.rows(sequence)
                    context[rows] = self._attention(q[rows], k[rows], v[rows], dtype)
        for sequence in map_sequences:  # maps are outputs: q and k stay float32
            rows = batch.rows(sequence)
            qf, kf, vs = q[rows].transpose(0, 1), k[rows].transpose(0, 1), v[rows].to(dtype)
            out = self._attention_with_maps(
                qf, kf, vs.transpose(0, 1), lambda h, p, s=sequence: on_maps(s, h, p)
            )
            context[rows] = out.transpose(0, 1)
        return feed_forward(
            x, context.reshape(n, e), self.out_proj, self.ffn_norm, self.fc1, self.fc2
        )

    def _attention(self, q, k, v, dtype) -> torch.Tensor:
        """One sequence's fused attention: (T, H, D) each => (T, H, D)."""
        # (T, H, D) => (1, H, T, D): 4-D inputs reach the fused CPU and GPU kernels
        qs, ks, vs = (t.to(dtype).unsqueeze(0).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qs, ks, vs, scale=self.scaling)[0].transpose(0, 1)

    def _attention_with_maps(self, q, k, v, on_maps):
        """Explicit softmax attention, a block of heads at a time; each block's
        probabilities (heads, T, T) go to `on_maps` before they are freed."""
        t = q.shape[1]
        block = max(1, min(self.heads, _MAX_ATTENTION_BLOCK_BYTES // (4 * t * t)))
        outputs = []
        for first in range(0, self.heads, block):
            heads = slice(first, first + block)
            scores = torch.matmul(q[heads] * self.scaling, k[heads].transpose(1, 2))
            probs = torch.softmax(scores, dim=-1)  # float32, as fair-esm's
            del scores
            outputs.append(torch.matmul(probs.to(v.dtype), v[heads]))
            on_maps(first, probs)
        return torch.cat(outputs, dim=0)


def can_pack_attention(q: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `packed_attention` runs: FlashAttention's kernels are CUDA, half precision."""
    return varlen_attn is not None and q.is_cuda and dtype in (torch.float16, torch.bfloat16)


def packed_attention(q, k, v, batch: PackedBatch, dtype: torch.dtype) -> torch.Tensor | None:
    """Attention of every sequence of `batch` in one variable-length flash-attention call,
    (N, H, D) each => (N, H, D) in `dtype`; None where that kernel cannot run (CPU,
    float32, torch before 2.10), and the caller attends per sequence. Its scale is
    1/sqrt(D), ESM-2's."""
    if not can_pack_attention(q, dtype):
        return None
    bounds, longest = batch.cumulative_lengths, max(batch.lengths)
    return varlen_attn(q.to(dtype), k.to(dtype), v.to(dtype), bounds, bounds, longest, longest)


class LanguageModelHead(nn.Module):
    """RobertaLMHead: dense, GELU, layer norm, then the (tied) embedding matrix."""

    def __init__(self, embed_dim: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(embed_dim, embed_dim)
        self.layer_norm = nn.LayerNorm(embed_dim, eps=_LAYER_NORM_EPS)
        self.weight = nn.Parameter(torch.empty(vocab_size, embed_dim))
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.layer_norm(linear(x, self.dense, gelu=True)), self.weight) + self.bias


class Esm2(nn.Module):
    """ESM-2 for inference on packed batches. Build with `Esm2.from_checkpoint`."""

    def __init__(self, num_layers: int, embed_dim: int, attention_heads: int, token_dropout: bool):
        super().__init__()
        self.num_layers = num_layers
        self.embed_dim = embed_dim
        self.attention_heads = attention_heads
        self.token_dropout = token_dropout
        self.embed_tokens = nn.Embedding(len(VOCAB_TOKENS), embed_dim, padding_idx=PAD_INDEX)
        self.layers = nn.ModuleList(
            EncoderLayer(embed_dim, attention_heads) for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(embed_dim, eps=_LAYER_NORM_EPS)
        self.lm_head = LanguageModelHead(embed_dim, len(VOCAB_TOKENS))
        self.rotary = RotaryTable(embed_dim // attention_heads)
        self.register_buffer("contact_weight", torch.zeros(num_layers, attention_heads))
        self.register_buffer("contact_bias", torch.zeros(()))

    def compute_in(self, dtype: torch.dtype) -> Esm2:
        """Runs attention and the output and feed-forward products in `dtype` (float16 or
        bfloat16 on GPUs; float32, the default, is exact); everything else stays float32."""
        for layer in self.layers:
            for linear in (layer.out_proj, layer.fc1, layer.fc2):
                linear.to(dtype)
        return self

    def pack_for_cpu(self) -> Esm2:
        """Prepacks every linear layer's weight in oneDNN's blocked layout (done once, at
        load), so each product skips the repacking a plain BLAS call does, and fuses
        GELU into its product. The same float32 arithmetic, 10 to 35% faster products on
        this CPU. A no-op where torch has no oneDNN or the model is not on a CPU."""
        if not torch.backends.mkldnn.is_available():
            return self
        for module in self.modules():
            weight = module.weight if isinstance(module, nn.Linear) else None
            if weight is not None and weight.device.type == "cpu" and weight.dtype == torch.float32:
                weight = weight.detach()
                module.onednn_weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        return self

    def float32_copy(self) -> Esm2:
        """An unpacked float32 copy of this model, whatever `compute_in` and
        `pack_for_cpu` did to it (what OpenVINO converts for a half-precision engine)."""
        packed = {
            m: m.__dict__.pop("onednn_weight")
            for m in self.modules()
            if "onednn_weight" in m.__dict__
        }
        try:
            return copy.deepcopy(self).float()
        finally:
            for module, weight in packed.items():
                module.onednn_weight = weight

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> Esm2:
        model = cls(
            checkpoint.num_layers,
            checkpoint.embed_dim,
            checkpoint.attention_heads,
            checkpoint.token_dropout,
        )
        model.load_state_dict(_state_from_fair_esm(checkpoint.state_dict, checkpoint.num_layers))
        return model.eval()

    def forward(
        self, batch: PackedBatch, plan: ForwardPlan
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Returns the final hidden states (N, E), after the last layer norm, and the
        hidden states of `plan.repr_layers` by layer."""
        x = self._embed(batch)
        hidden = {0: x} if 0 in plan.repr_layers else {}
        rotary = self.rotary.lookup(batch.positions, max(batch.lengths), x.dtype)
        for index, layer in enumerate(self.layers, start=1):
            map_sequences = plan.attention_maps.get(index, frozenset())

            def on_maps(sequence, first_head, probs, layer_index=index):
                plan.attention_observer(layer_index, sequence, first_head, probs)

            x = layer(x, batch, rotary, map_sequences, on_maps)
            if index in plan.repr_layers and index < self.num_layers:
                hidden[index] = x
        x = self.final_norm(x)
        if self.num_layers in plan.repr_layers:
            hidden[self.num_layers] = x
        return x, hidden

    def _embed(self, batch: PackedBatch) -> torch.Tensor:
        x = self.embed_tokens(batch.tokens)  # (N, E)
        if self.token_dropout:
            is_mask = batch.tokens == MASK_INDEX
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
            lengths = torch.tensor(batch.lengths, device=x.device, dtype=x.dtype)
            masked = torch.zeros(len(batch.lengths), device=x.device, dtype=x.dtype)
            masked.index_add_(0, batch.sequence_ids, is_mask.to(x.dtype))
            scale = (1 - _MASK_RATIO_TRAIN) / (1 - masked / lengths)
            x = x * scale[batch.sequence_ids].unsqueeze(-1)
        return x

    def logits(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """(rows, E) final hidden states => (rows, vocab) logits."""
        return self.lm_head(final_hidden)


def _state_from_fair_esm(
    state: dict[str, torch.Tensor], num_layers: int
) -> dict[str, torch.Tensor]:
    """Renames fair-esm's parameters to ours and fuses each layer's q, k, v."""
    ours = {
        "embed_tokens.weight": state["embed_tokens.weight"],
        "final_norm.weight": state["emb_layer_norm_after.weight"],
        "final_norm.bias": state["emb_layer_norm_after.bias"],
        "contact_weight": state["contact_head.regression.weight"].reshape(num_layers, -1),
        "contact_bias": state["contact_head.regression.bias"].reshape(()),
    }
    for name in (
        "dense.weight",
        "dense.bias",
        "layer_norm.weight",
        "layer_norm.bias",
        "weight",
        "bias",
    ):
        ours[f"lm_head.{name}"] = state[f"lm_head.{name}"]
    renames = {
        "self_attn_layer_norm": "attention_norm",
        "self_attn.out_proj": "out_proj",
        "final_layer_norm": "ffn_norm",
        "fc1": "fc1",
        "fc2": "fc2",
    }
    for i in range(num_layers):
        theirs = f"layers.{i}."
        for old, new in renames.items():
            for suffix in ("weight", "bias"):
                ours[f"layers.{i}.{new}.{suffix}"] = state[f"{theirs}{old}.{suffix}"]
        for suffix in ("weight", "bias"):
            parts = [state[f"{theirs}self_attn.{p}_proj.{suffix}"] for p in "qkv"]
            ours[f"layers.{i}.qkv.{suffix}"] = torch.cat(parts, dim=0)
    return ours
