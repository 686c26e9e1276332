"""ESM-2 checkpoints in fair-esm's file format: safe loading and random ones for tests.

fair-esm 2.0.0 calls `torch.load` without `weights_only`, which torch >= 2.6 turns
into a weights-only load that refuses the `argparse.Namespace` real checkpoints
hold. We load with weights-only unpickling plus an explicit allow-list, never with
`weights_only=False`, so a checkpoint cannot run code when it is opened.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import pickle
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from esm2_service.cli_help import HelpFormatter, epilog

log = logging.getLogger(__name__)

HUB_MODEL_NAME = "esm2_t6_8M_UR50D"
# The only non-tensor, non-container type a fair-esm ESM-2 checkpoint holds.
ALLOWED_GLOBALS = [argparse.Namespace]
# Written by make_random_checkpoint; absent from every real fair-esm checkpoint.
RANDOM_MARKER = "esm2_service_random_weights"
_STATE_PREFIX = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")

FULL_SHAPE = {"num_layers": 6, "embed_dim": 320, "attention_heads": 20}
# Same depth as ESM-2 8M, so every layer index of the API is valid; tiny width.
TINY_SHAPE = {"num_layers": 6, "embed_dim": 32, "attention_heads": 4}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, malformed or holds objects outside the allow-list."""


@dataclass(frozen=True)
class Checkpoint:
    """Weights and dimensions of one ESM-2 model, ready to build a model from."""

    name: str
    state_dict: dict[str, torch.Tensor]
    num_layers: int
    embed_dim: int
    attention_heads: int
    token_dropout: bool
    sha256: str
    random_weights: bool


def regression_path(model_path: Path) -> Path:
    """fair-esm's name for the contact-regression file beside a model file."""
    return model_path.with_name(model_path.stem + "-contact-regression.pt")


def safe_torch_load(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if unsupported:
            raise CheckpointError(
                f"refusing to load {path}: it holds {unsupported.group(1)}, outside the allow-list "
                "(tensors, containers, argparse.Namespace); it was not unpickled"
            ) from error
        raise CheckpointError(f"{path} is not a readable torch checkpoint") from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {error}") from error


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: str | Path | None) -> Checkpoint:
    """Loads a fair-esm ESM-2 checkpoint from `path` (its regression file beside it),
    or, when `path` is None, esm2_t6_8M_UR50D through fair-esm's download and cache."""
    model_path = _download_through_fair_esm() if path is None else Path(path)
    model_data = safe_torch_load(model_path)
    regression_file = regression_path(model_path)
    if not regression_file.is_file():
        raise CheckpointError(
            f"contact regression weights not found: expected {regression_file} beside {model_path}"
        )
    regression_data = safe_torch_load(regression_file)
    return _checkpoint_from_data(model_path, model_data, regression_data)


def _download_through_fair_esm() -> Path:
    import esm.pretrained

    log.info("ESM2_WEIGHTS unset: fetching %s through fair-esm's download cache", HUB_MODEL_NAME)
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            esm.pretrained._download_model_and_regression_data(HUB_MODEL_NAME)
    except Exception as error:  # fair-esm raises bare Exception and URLError alike
        raise CheckpointError(
            f"could not download {HUB_MODEL_NAME} through fair-esm ({error}); "
            "set ESM2_WEIGHTS to a local checkpoint (esm2 make-checkpoint makes a random one)"
        ) from error
    return Path(torch.hub.get_dir()) / "checkpoints" / f"{HUB_MODEL_NAME}.pt"


def _checkpoint_from_data(model_path: Path, model_data: dict, regression_data: dict) -> Checkpoint:
    try:
        config = model_data["cfg"]["model"]
        state = {_STATE_PREFIX.sub("", k): v for k, v in model_data["model"].items()}
        state.update(regression_data["model"])
        return Checkpoint(
            name=model_path.stem,
            state_dict=state,
            num_layers=int(config.encoder_layers),
            embed_dim=int(config.encoder_embed_dim),
            attention_heads=int(config.encoder_attention_heads),
            token_dropout=bool(config.token_dropout),
            sha256=sha256_of(model_path),
            random_weights=bool(model_data.get(RANDOM_MARKER, False)),
        )
    except (KeyError, AttributeError, TypeError) as error:
        raise CheckpointError(
            f"{model_path} is not an ESM-2 checkpoint in fair-esm's format (missing {error})"
        ) from error


def build_fair_esm_model(checkpoint: Checkpoint):
    """fair-esm's own ESM2 on these weights: the reference every output must match."""
    import esm

    model = esm.model.esm2.ESM2(
        num_layers=checkpoint.num_layers,
        embed_dim=checkpoint.embed_dim,
        attention_heads=checkpoint.attention_heads,
        alphabet=esm.data.Alphabet.from_architecture("ESM-1b"),
        token_dropout=checkpoint.token_dropout,
    )
    model.load_state_dict(checkpoint.state_dict, strict=True)
    return model.eval()


def make_random_checkpoint(out_path: str | Path, *, tiny: bool = False, seed: int = 0) -> Path:
    """Writes a random-weights ESM-2 checkpoint and its regression file in fair-esm's
    format: the 8M shape, or a tiny one of the same depth for fast tests."""
    import esm

    out_path = Path(out_path)
    shape = TINY_SHAPE if tiny else FULL_SHAPE
    torch.manual_seed(seed)
    model = esm.model.esm2.ESM2(**shape, alphabet="ESM-1b", token_dropout=True)
    _perturb(model)
    state = model.state_dict()
    regression = {k: state.pop(k) for k in list(state) if k.startswith("contact_head.")}
    prefixed = {
        (f"encoder.{k}" if k.startswith("lm_head.") else f"encoder.sentence_encoder.{k}"): v
        for k, v in state.items()
    }
    config = argparse.Namespace(
        encoder_layers=shape["num_layers"],
        encoder_embed_dim=shape["embed_dim"],
        encoder_attention_heads=shape["attention_heads"],
        token_dropout=True,
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": prefixed, "cfg": {"model": config}, RANDOM_MARKER: True}, out_path)
    torch.save({"model": regression}, regression_path(out_path))
    return out_path


@torch.no_grad()
def _perturb(model: torch.nn.Module) -> None:
    """Moves layer norms and biases off their identity init, so tests that compare
    against fair-esm exercise every parameter."""
    for name, parameter in model.named_parameters():
        if name.endswith("bias"):
            parameter.normal_(0.0, 0.05)
        elif "layer_norm" in name:
            parameter.normal_(1.0, 0.1)
        elif name.startswith("contact_head."):
            parameter.normal_(0.0, 0.2)


def build_parser() -> argparse.ArgumentParser:
    """`esm2 make-checkpoint --random OUT.pt [--tiny] [--seed N]`."""
    parser = argparse.ArgumentParser(
        prog="esm2 make-checkpoint",
        description="Write a random-weights ESM-2 checkpoint and its -contact-regression.pt "
        "in fair-esm's file format. Outputs are meaningless: for tests and benchmarks only.",
        epilog=epilog(
            "esm2 make-checkpoint --random ckpt/esm2_t6_8M_UR50D.pt",
            {0: "written", 1: "failed to write", 2: "bad usage"},
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("out", type=Path, help="the .pt file to write")
    parser.add_argument(
        "--random",
        action="store_true",
        required=True,
        help="random weights (the only kind this command makes)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="6 layers, 32 dims, 4 heads instead of ESM-2 8M's 320 dims, 20 heads",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out.suffix != ".pt":
        parser.error(f"{args.out} must end in .pt (fair-esm derives the regression file's name)")
    path = make_random_checkpoint(args.out, tiny=args.tiny, seed=args.seed)
    print(f"wrote {path} and {regression_path(path)} (RANDOM weights, sha256 {sha256_of(path)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
