"""In-process contenders: fair-esm (the reference), Hugging Face `EsmModel`, our engine.

Each builds a warmed-up pass over a corpus that computes the mean embedding of the
last layer per sequence, the job the service is timed on (`bench.timing.time_rounds`
times them; tokens/s counts residues only, no <cls>/<eos>, no padding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from bench.corpus import Corpus
from bench.timing import Contender
from esm2_service.alphabet import PAD_INDEX, token_ids
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.worker.checkpoint import Checkpoint, build_fair_esm_model
from esm2_service.worker.work import TensorOutput, WorkItem

BATCH_SIZE = 8
COMPUTE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def synchronize(device: str) -> None:
    """Waits for queued GPU work, so a timed pass ends when its results exist."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def chunked(values: Sequence, size: int = BATCH_SIZE) -> list[list]:
    """`values` in consecutive lists of at most `size`."""
    return [list(values[start : start + size]) for start in range(0, len(values), size)]


def fair_esm_contender(checkpoint: Checkpoint, corpus: Corpus, device: str = "cpu") -> Contender:
    """fair-esm's `ESM2.forward` (fp32) in batches of 8 in arrival order, padded by its
    own batch converter; warmed up with one batch."""
    import esm

    model = build_fair_esm_model(checkpoint).to(device)
    convert = esm.data.Alphabet.from_architecture("ESM-1b").get_batch_converter()
    batches = chunked(list(zip(corpus.ids, corpus.sequences, strict=True)))
    last = model.num_layers

    def run_batch(batch):
        _, strings, tokens = convert(batch)
        states = model(tokens.to(device), repr_layers=[last])["representations"][last]
        return [states[i, 1 : len(s) + 1].mean(0) for i, s in enumerate(strings)]

    label = "fair-esm ESM2.forward, batches of 8, arrival order"
    return _warmed_up(label, run_batch, batches, device)


def hf_esm_model(checkpoint: Checkpoint) -> torch.nn.Module:
    """transformers' `EsmModel` in the ESM-2 8M shape with `checkpoint`'s weights, SDPA
    attention: the same model as fair-esm's, so every contender's output is comparable."""
    import transformers
    from transformers import EsmConfig, EsmModel

    transformers.logging.set_verbosity_error()
    config = EsmConfig(
        vocab_size=33,
        hidden_size=checkpoint.embed_dim,
        num_hidden_layers=checkpoint.num_layers,
        num_attention_heads=checkpoint.attention_heads,
        intermediate_size=4 * checkpoint.embed_dim,
        position_embedding_type="rotary",
        token_dropout=True,
        mask_token_id=32,
        pad_token_id=PAD_INDEX,
        layer_norm_eps=1e-5,
        emb_layer_norm_before=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=1026,
        attn_implementation="sdpa",
    )
    model = EsmModel(config, add_pooling_layer=False).eval()
    model.load_state_dict(_hf_state(checkpoint), strict=False)  # inv_freq: computed, not loaded
    return model


_HF_LAYER_NAMES = {
    "self_attn.q_proj": "attention.self.query",
    "self_attn.k_proj": "attention.self.key",
    "self_attn.v_proj": "attention.self.value",
    "self_attn.out_proj": "attention.output.dense",
    "self_attn_layer_norm": "attention.LayerNorm",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
    "final_layer_norm": "LayerNorm",
}


def _hf_state(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """fair-esm's parameter names => transformers' (as its convert_esm.py maps them)."""
    state = checkpoint.state_dict
    hf = {
        "embeddings.word_embeddings.weight": state["embed_tokens.weight"],
        "encoder.emb_layer_norm_after.weight": state["emb_layer_norm_after.weight"],
        "encoder.emb_layer_norm_after.bias": state["emb_layer_norm_after.bias"],
        "contact_head.regression.weight": state["contact_head.regression.weight"],
        "contact_head.regression.bias": state["contact_head.regression.bias"],
    }
    for i in range(checkpoint.num_layers):
        for theirs, ours in _HF_LAYER_NAMES.items():
            for suffix in ("weight", "bias"):
                hf[f"encoder.layer.{i}.{ours}.{suffix}"] = state[f"layers.{i}.{theirs}.{suffix}"]
    return hf


def padded_tokens(sequences: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, attention mask), both (batch, longest + 2), padded with <pad>."""
    token_lists = [list(token_ids(sequence)) for sequence in sequences]
    width = max(len(tokens) for tokens in token_lists)
    ids = torch.full((len(token_lists), width), PAD_INDEX, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return ids, mask


def hf_contender(checkpoint: Checkpoint, corpus: Corpus, device: str = "cpu") -> Contender:
    """HF `EsmModel` (sdpa, fp32) in batches of 8 sorted by length; warmed up with one batch."""
    model = hf_esm_model(checkpoint).to(device)
    batches = chunked(sorted(corpus.sequences, key=len))

    def run_batch(batch):
        ids, mask = padded_tokens(batch)
        states = model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        return [states[i, 1 : len(s) + 1].mean(0) for i, s in enumerate(batch)]

    label = "HF EsmModel (sdpa), batches of 8, length-sorted"
    return _warmed_up(label, run_batch, batches, device)


def _warmed_up(label: str, run_batch, batches: list[list], device: str) -> Contender:
    """The contender running `run_batch` over `batches` without autograd, after one
    untimed batch."""

    @torch.inference_mode()
    def run_pass():
        for batch in batches:
            run_batch(batch)
        synchronize(device)

    with torch.inference_mode():
        run_batch(batches[0])
    return Contender(label, run_pass)


def work_item(sequence: str, last_layer: int = 6) -> WorkItem:
    """The work item a worker builds for an Encode of `sequence` (mean, last layer)."""
    return WorkItem(
        token_ids=token_ids(sequence),
        include=frozenset([pb.INCLUDE_MEAN]),
        repr_layers=(last_layer,),
    )


def _discard(output: TensorOutput) -> None:
    """An `emit` that drops every output."""


def build_engine(checkpoint: Checkpoint, device: str = "cpu", precision: str = "fp32"):
    """Our serving engine on `checkpoint`, as a worker builds it."""
    from esm2_service.worker.engine import Engine
    from esm2_service.worker.model import Esm2

    return Engine(Esm2.from_checkpoint(checkpoint), device, COMPUTE_DTYPES[precision])


def engine_contender(engine, corpus: Corpus) -> Contender:
    """`engine.run` in packed batches of 8 sorted by length; warmed up with one pass."""
    label = "our engine in-process, batches of 8, length-sorted"
    return runner_contender(label, engine, corpus, engine.model.num_layers, BATCH_SIZE)


def worker_runner_contender(runner, corpus: Corpus) -> Contender:
    """The worker's `OpenVinoRunner.run` in batches of 8 sorted by length."""
    label = "the worker's OpenVINO runner in-process, batches of 8"
    return runner_contender(label, runner, corpus, runner.engine.model.num_layers, BATCH_SIZE)


def runner_contender(
    label: str, runner, corpus: Corpus, last_layer: int, batch_size: int
) -> Contender:
    """A worker `Runner`'s `run` (mean of `last_layer`) in batches of `batch_size`
    sorted by length; warmed up with one pass."""
    batches = chunked(sorted(corpus.sequences, key=len), batch_size)

    def run_pass():
        for batch in batches:
            runner.run([work_item(sequence, last_layer) for sequence in batch], _discard)

    run_pass()
    return Contender(label, run_pass)


def engine_call(engine, sequence: str) -> Callable[[], None]:
    """One `engine.run` of `sequence` alone (mean, last layer), for latency timings."""
    return runner_call(engine, sequence, engine.model.num_layers)


def runner_call(runner, sequence: str, last_layer: int) -> Callable[[], None]:
    """One `run` of a worker `Runner` on `sequence` alone (mean of `last_layer`)."""

    def call() -> None:
        runner.run([work_item(sequence, last_layer)], _discard)

    return call
