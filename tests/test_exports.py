"""The public surface: ``corral.__all__`` and the command line's help."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

import corral
from corral.cli.parser import build_parser

# The documented public surface. Changing it is an API change: update README/CHANGELOG too.
PUBLIC = {
    "Change",
    "CorralError",
    "FlagCatalog",
    "LlamaConfig",
    "__version__",
    "parse_change",
    "parse_help",
}


def test_all_is_the_documented_surface() -> None:
    """corral.__all__ is exactly the documented public names, sorted, once each."""
    assert set(corral.__all__) == PUBLIC
    assert len(corral.__all__) == len(set(corral.__all__))
    assert list(corral.__all__) == sorted(corral.__all__)


@pytest.mark.parametrize("name", sorted(PUBLIC - {"__version__"}))
def test_exported_member_exists_and_is_corrals(name: str) -> None:
    """Each exported name is defined in corral and has a docstring."""
    member = getattr(corral, name)
    assert member.__module__.startswith("corral.")
    assert member.__doc__, f"{name} has no docstring"


def test_star_import() -> None:
    """from corral import * brings every public name."""
    namespace: dict[str, object] = {}
    exec("from corral import *", namespace)
    assert set(namespace) >= PUBLIC


def test_version_matches_the_package_metadata() -> None:
    """corral.__version__ is the installed package's version."""
    assert corral.__version__ == importlib.metadata.version("corral")


def run_corral(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "PYTHONWARNINGS": "error"}
    return subprocess.run([sys.executable, "-m", "corral", *args], capture_output=True,
                          text=True, timeout=60, env=env, check=False)


def _subparser(name: str) -> argparse.ArgumentParser:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]  # type: ignore[no-any-return]
    raise AssertionError("no subcommands")


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_top_level_help() -> None:
    """corral --help lists every command and writes nothing to stderr."""
    result = run_corral("--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    for command in ("supervise", "status", "params", "apply"):
        assert command in result.stdout


def test_version_flag() -> None:
    """corral --version prints the version."""
    result = run_corral("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"corral {corral.__version__}"


def test_missing_command_is_a_usage_error() -> None:
    """corral without a command is a usage error (exit 2)."""
    result = run_corral()
    assert result.returncode == 2
    assert "usage:" in result.stderr


SUPERVISE = _subparser("supervise")
SUPERVISE_OPTIONS = [a for a in SUPERVISE._actions
                     if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.fixture(scope="module")
def supervise_help() -> str:
    result = run_corral("supervise", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def test_supervise_has_the_proposals_flags() -> None:
    """corral supervise has the flags the proposal names."""
    flags = {s for a in SUPERVISE_OPTIONS for s in a.option_strings}
    assert {"--supervisor-addr", "--binary", "--model", "-m", "--port", "--args",
            "--config-driver", "--monitoring-interval"} <= flags


@pytest.mark.parametrize("action", SUPERVISE_OPTIONS, ids=lambda a: a.option_strings[0])
def test_supervise_help_mentions_flag(action: argparse.Action, supervise_help: str) -> None:
    """Every supervise flag appears in its --help, with help text."""
    for spelling in action.option_strings:
        assert re.search(rf"(^|[\s,\[]){re.escape(spelling)}\b", supervise_help), spelling
    assert action.help, f"{action.option_strings[0]} has no help text"


WITH_DEFAULT = [a for a in SUPERVISE_OPTIONS
                if a.default is not None and not isinstance(a, argparse._StoreTrueAction)]


@pytest.mark.parametrize("action", WITH_DEFAULT, ids=lambda a: a.option_strings[0])
def test_supervise_help_states_defaults(action: argparse.Action, supervise_help: str) -> None:
    """Every supervise flag with a default states it in --help."""
    default = action.default
    shown = f"{default:g}" if isinstance(default, float) else str(default)
    pattern = rf"\(default: {re.escape(shown)}[);]"
    assert re.search(pattern, _flat(supervise_help)), action.option_strings[0]


def test_supervise_help_has_examples(supervise_help: str) -> None:
    """supervise --help ends with examples of the API and the config driver."""
    assert "examples:" in supervise_help
    assert "/v1/params" in supervise_help
    assert "--config-driver" in supervise_help
