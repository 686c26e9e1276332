"""`make setup` installs the CPU build of torch on a plain machine, and keeps a pip
that is configured with its own package index (our build machines, a mirror); `make
serve` installs what serving needs, without the dev tools, and without setuptools'
editable-install notice."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from support import ROOT

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def torch_install_line(env_changes: dict[str, str | None], *make_args: str) -> str:
    """The pip command `make setup` would run for torch (make -n runs nothing)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "MAKE"))}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    printed = subprocess.run(
        ["make", "-n", "-B", ".venv/bin/.installed", *make_args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (line,) = [line for line in printed.splitlines() if re.search(r"pip install .*torch==", line)]
    return line


def test_a_plain_machine_gets_the_cpu_build_from_pytorchs_index():
    line = torch_install_line({"PIP_CONFIG_FILE": os.devnull})
    assert f"--index-url {CPU_INDEX} torch==2.13.0" in line


@pytest.mark.parametrize(
    "configured",
    [{"PIP_INDEX_URL": "https://mirror.example/simple"}, {"PIP_FIND_LINKS": "/opt/wheels"}],
)
def test_a_pip_with_its_own_index_keeps_it(configured):
    line = torch_install_line({"PIP_CONFIG_FILE": os.devnull, **configured})
    assert "--index-url" not in line
    assert line.rstrip().endswith("torch==2.13.0")


def test_torch_index_picks_another_build():
    cuda = "https://download.pytorch.org/whl/cu128"
    line = torch_install_line({"PIP_CONFIG_FILE": os.devnull}, f"TORCH_INDEX={cuda}")
    assert f"--index-url {cuda} torch==2.13.0" in line
    line = torch_install_line({"PIP_CONFIG_FILE": os.devnull}, "TORCH_INDEX=default")
    assert "--index-url" not in line


def make_commands(target: str) -> list[str]:
    """The commands `make TARGET` would run on a fresh clone (make -n runs nothing)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    printed = subprocess.run(
        ["make", "-n", "-B", target], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    return printed.splitlines()


def test_make_serve_installs_the_service_without_the_dev_tools():
    installs = [line for line in make_commands("serve") if "pip install" in line and " -e " in line]
    assert installs and all("dev" not in line for line in installs)
    assert any("dev]" in line for line in make_commands(".venv/bin/.installed"))


def test_editable_installs_silence_setuptools_editable_notice():
    editable = [line for line in make_commands("setup") if "pip install" in line and " -e " in line]
    assert editable
    assert all('PYTHONWARNINGS="ignore:Editable installation"' in line for line in editable)
