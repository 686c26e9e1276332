"""The README's grpcurl example, run as written against a live service."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from support import ROOT, assert_close, fair_esm_outputs

# The wheel's grpcurl is in the same bin folder as this interpreter.
BIN = str(Path(sys.executable).parent)


def readme_grpcurl_commands() -> str:
    """The shell block right after the README's "With [grpcurl]" paragraph."""
    readme = (ROOT / "README.md").read_text()
    after = readme[readme.index("With [grpcurl]") :]
    return re.search(r"```sh\n(.*?)```", after, re.DOTALL).group(1)


def json_messages(text: str) -> list[dict]:
    """grpcurl prints one JSON object per message, one after another."""
    decoder, messages, position = json.JSONDecoder(), [], 0
    while text[position:].strip():
        position += len(text[position:]) - len(text[position:].lstrip())
        message, position = decoder.raw_decode(text, position)
        messages.append(message)
    return messages


def test_the_readmes_grpcurl_example_works_as_written(service, tiny_reference):
    assert shutil.which("grpcurl", path=BIN), "grpcurl is not installed (make setup)"
    commands = readme_grpcurl_commands().replace("localhost:50051", service.target)
    assert "-emit-defaults" in commands
    encode, health = commands.strip().split("\ngrpcurl ")

    done = subprocess.run(
        ["bash", "-c", encode],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"},
    )
    assert done.returncode == 0, done.stderr
    messages = json_messages(done.stdout)
    # -emit-defaults: the first (only) item's index 0 is printed, not left out.
    assert {message["sequence_index"] for message in messages} == {0}
    chunks = {message["chunk"]["kind"]: message["chunk"] for message in messages[:-1]}
    assert set(chunks) == {"INCLUDE_MEAN", "INCLUDE_CONTACTS"}
    assert chunks["INCLUDE_MEAN"]["layer"] == 6 and chunks["INCLUDE_MEAN"]["offset"] == "0"
    assert messages[-1]["complete"]["vocab_tokens"][:5] == ["<cls>", "<pad>", "<eos>", "<unk>", "L"]

    expected = fair_esm_outputs(tiny_reference, "MKTAYIAK", layers=(6,))
    for kind, want in (("INCLUDE_MEAN", expected["mean"][6]), ("INCLUDE_CONTACTS", None)):
        tensor = chunks[kind]["tensor"]
        array = np.frombuffer(base64.b64decode(tensor["data"]), "<f4")
        shape = [int(size) for size in tensor["shape"]]
        want = expected["contacts"] if want is None else want
        assert_close(array.reshape(shape), want, what=kind)

    checked = subprocess.run(
        ["bash", "-c", "grpcurl " + health],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"},
    )
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout) == {"status": "SERVING"}
