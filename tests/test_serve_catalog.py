"""corral serve's catalog: named configs and --models-dir become models; bad entries are
clear usage errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.core.args import FlagCatalog
from corral.errors import UsageError
from corral.serve.catalog import read_catalog, serve_options, toml_tables

BIN = "/usr/bin/llama-server"


def test_models_dir_adds_each_gguf_unless_a_config_of_that_name_is_stored(tmp_path: Path
                                                                           ) -> None:
    """alpha.gguf and beta.gguf in the folder, a stored 'beta': alpha comes from the folder
    (its file as --model), beta is the stored one; other files are not models."""
    for name in ("alpha.gguf", "beta.gguf", "notes.txt"):
        (tmp_path / name).write_bytes(b"GGUF")
    tables = {"beta": {"binary": BIN, "serve": {"aliases": ["b"], "ttl": 60, "pin": True}}}
    entries = read_catalog(tables, "file x", tmp_path, BIN, [], FlagCatalog())
    assert sorted(entries) == ["alpha", "beta"]
    assert entries["alpha"].fallback is not None
    assert entries["alpha"].fallback.get("--model") == str((tmp_path / "alpha.gguf").resolve())
    assert entries["beta"].fallback is None
    assert (entries["beta"].serve.aliases, entries["beta"].serve.ttl_s,
            entries["beta"].serve.pin) == (("b",), 60.0, True)


@pytest.mark.parametrize(("raw", "message"), [
    ({"ttl": "soon"}, "ttl must be seconds"),
    ({"ttl": -1}, "ttl must be seconds"),
    ({"pin": "yes"}, "pin must be true or false"),
    ({"aliases": "b"}, "aliases must be a list"),
    ({"keep": 1}, "unknown key"),
    ("x", "must be a table"),
])
def test_a_bad_serve_table_is_a_usage_error(raw: object, message: str) -> None:
    """Every malformed [name.serve] says which table and what is wrong."""
    with pytest.raises(UsageError, match=message) as caught:
        serve_options("qwen", raw)
    assert "[qwen.serve]" in str(caught.value)


def test_an_alias_may_not_shadow_a_model_or_another_alias() -> None:
    """Two ids for one name would route at random: refused, naming both."""
    tables = {"a": {"binary": BIN, "serve": {"aliases": ["b"]}}, "b": {"binary": BIN}}
    with pytest.raises(UsageError, match="alias 'b' of 'a' is already the name of a model"):
        read_catalog(tables, "file x", None, BIN, [], FlagCatalog())
    tables = {"a": {"binary": BIN, "serve": {"aliases": ["x"]}},
              "c": {"binary": BIN, "serve": {"aliases": ["x"]}}}
    with pytest.raises(UsageError, match="an alias of a"):
        read_catalog(tables, "file x", None, BIN, [], FlagCatalog())


def test_no_models_and_a_bad_file_are_clear(tmp_path: Path) -> None:
    """Nothing to serve says why; a config file that is not TOML names itself; a missing
    file is an empty catalog; tables without a binary are not models."""
    with pytest.raises(UsageError, match="no models: file x has no named config, and no "
                                         "--models-dir was given"):
        read_catalog({}, "file x", None, BIN, [], FlagCatalog())
    with pytest.raises(UsageError, match=f"--models-dir {tmp_path} has no \\*.gguf"):
        read_catalog({}, "file x", tmp_path, BIN, [], FlagCatalog())
    bad = tmp_path / "c.toml"
    bad.write_text("[a\n")
    with pytest.raises(UsageError, match="is not valid TOML"):
        toml_tables(bad)
    assert toml_tables(tmp_path / "missing.toml") == {}
    bad.write_text('[a]\nbinary = "x"\n[other]\nkey = 1\n')
    assert list(toml_tables(bad)) == ["a"]
