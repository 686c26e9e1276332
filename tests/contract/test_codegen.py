"""The contract holds still and generates cleanly: buf lint (STANDARD) and breaking
against the frozen v1 baseline, protoc for C++, Java, C# and Python without a
warning, and the Go and TypeScript clients' generated code up to date."""

from __future__ import annotations

import filecmp
import shutil
import subprocess

import pytest
import yaml
from support import ROOT

PROTOS = ROOT / "protos"
BUF = ROOT / "client" / "node" / "node_modules" / ".bin" / "buf"
BASELINE = PROTOS / "v1-baseline.json"
PUBLIC_PROTO = "esm2/v1/esm2.proto"


def run(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(map(str, args)), cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_buf_lint_applies_the_standard_rules_without_exceptions():
    config = yaml.safe_load((PROTOS / "buf.yaml").read_text())
    assert config["lint"] == {"use": ["STANDARD"]}  # no except:, no ignore:
    linted = run(BUF, "lint", PROTOS)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_the_contract_is_compatible_with_the_frozen_v1_baseline():
    checked = run(BUF, "breaking", PROTOS, "--against", BASELINE)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize(
    ("old", "new", "reported"),
    [
        ("int64 offset = 4;", "int32 offset = 4;", 'changed type from "int64" to "int32"'),
        ("repeated int32 repr_layers = 1;", "repeated int32 layers = 1;", "changed name"),
        ("service Esm2Service {", "service Esm2 {", 'Previously present service "Esm2Service"'),
    ],
)
def test_an_incompatible_change_fails_the_check(tmp_path, old, new, reported):
    copy = tmp_path / "protos"
    shutil.copytree(PROTOS, copy, ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))
    proto = copy / PUBLIC_PROTO
    text = proto.read_text()
    assert old in text
    proto.write_text(text.replace(old, new, 1))

    checked = run(BUF, "breaking", copy, "--against", BASELINE)

    assert checked.returncode != 0
    assert reported in checked.stdout


def test_protoc_generates_cpp_java_csharp_and_python_without_warnings(tmp_path):
    outputs = {name: tmp_path / name for name in ("cpp", "java", "csharp", "python")}
    for folder in outputs.values():
        folder.mkdir()
    generated = run(
        "protoc",
        f"-I{PROTOS}",
        *(f"--{name}_out={folder}" for name, folder in outputs.items()),
        PUBLIC_PROTO,
    )
    assert generated.returncode == 0 and generated.stderr == "", generated.stderr
    assert (outputs["cpp"] / "esm2/v1/esm2.pb.cc").exists()
    assert (outputs["java"] / "com/esm2/v1/EncodeResponse.java").exists()  # java_multiple_files
    assert (outputs["csharp"] / "Esm2.cs").exists()
    assert (outputs["python"] / "esm2/v1/esm2_pb2.py").exists()


@pytest.mark.parametrize(
    ("template", "out"),
    [("client/go/buf.gen.yaml", "client/go"), ("client/node/buf.gen.yaml", "client/node")],
)
def test_generated_client_code_is_up_to_date(tmp_path, template, out):
    generated = run(
        BUF,
        "generate",
        "protos",
        "--template",
        template,
        "--path",
        "protos/esm2/v1",
        "-o",
        tmp_path,
    )
    assert generated.returncode == 0, generated.stderr
    fresh = sorted(path for path in tmp_path.rglob("*") if path.is_file())
    assert fresh, "buf generate wrote nothing"
    stale = [
        str(path.relative_to(tmp_path))
        for path in fresh
        if not filecmp.cmp(path, ROOT / out / path.relative_to(tmp_path), shallow=False)
    ]
    assert stale == [], f"regenerate with `make protos`: {stale}"


def test_every_generator_option_is_set():
    text = (PROTOS / PUBLIC_PROTO).read_text()
    for option in (
        "go_package",
        "java_package",
        "java_multiple_files",
        "java_outer_classname",
        "csharp_namespace",
        "ruby_package",
        "php_namespace",
        "objc_class_prefix",
    ):
        assert f"option {option} = " in text, option
