"""Least privilege, the pure rules: containment, the judge's verdicts, the failure limit."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.child.privilege import build_policy
from corral.core.args import Change, FlagCatalog, LlamaConfig, apply_change, merge_changes
from corral.core.args import parse_help as parse_catalog
from corral.core.limiter import FailureLimit
from corral.core.privilege import Judge, Policy, file_values, files_of, is_inside
from corral.errors import NotAllowed
from corral.store.base import StoredConfig
from corral.store.etcd.codec import decode_config, encode_config
from corral.store.toml_file import TomlFileStore
from tests.fake_llama_server import HELP as FAKE_HELP

ROOT = "/models"
segment = st.sampled_from(["a", "b", "..", ".", "", "models", "x.gguf"])


def ends_inside(segments: list[str]) -> bool:
    """The reference model: walk the segments from ROOT as a stack of directory names
    (``..`` at ``/`` stays at ``/``); is the walk's end ROOT or below it?"""
    stack = ["models"]
    for s in segments:
        if s == "..":
            if stack:
                stack.pop()
        elif s not in ("", "."):
            stack.append(s)
    return stack[:1] == ["models"]


@given(st.lists(segment, max_size=8))
def test_containment_matches_a_walk_of_the_segments(segments: list[str]) -> None:
    """is_inside says yes exactly when the walk from the root ends inside it."""
    path = posixpath.normpath(posixpath.join(ROOT, *segments))
    assert is_inside(path, ROOT) == ends_inside(segments)


@given(st.text(alphabet="ab/.", max_size=12))
def test_a_sibling_with_the_roots_name_as_prefix_is_outside(tail: str) -> None:
    """/models-evil and /modelsx are not inside /models, whatever follows."""
    assert not is_inside(f"/models-evil/{tail}", ROOT)
    assert not is_inside(f"/modelsx{tail}", ROOT) or f"/modelsx{tail}".startswith("/models/")


@pytest.mark.parametrize("path, root, inside", [
    ("/models", "/models", True), ("/models/a.gguf", "/models/", True),
    ("/models/../etc/passwd", "/models", False), ("relative.gguf", "/models", False),
    ("/", "/", True), ("/etc", "/", True),
])
def test_containment_table(path: str, root: str, inside: bool) -> None:
    """Edge cases of the containment check."""
    assert is_inside(path, root) is inside


@pytest.mark.parametrize("flag, value, names", [
    ("--model", "/m/a.gguf", ["/m/a.gguf"]),
    ("--lora", "/m/a.gguf,/m/b.gguf", ["/m/a.gguf", "/m/b.gguf"]),
    ("--lora-scaled", "/m/a.gguf:0.5,/x/b.gguf:1", ["/m/a.gguf", "/x/b.gguf"]),
    ("--model", True, []),
])
def test_file_values(flag: str, value: str, names: list[str]) -> None:
    """Comma lists and FNAME:SCALE values are split into the files they name."""
    assert file_values(flag, value) == names


CATALOG = parse_catalog(FAKE_HELP + "\n--lora FNAME   lora\n")


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """models/ with a model, a symlink out of it, and an outside file; two binaries."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "a.gguf").write_bytes(b"GGUF")
    outside = tmp_path / "secret.gguf"
    outside.write_bytes(b"GGUF")
    (models / "link.gguf").symlink_to(outside)
    allowed, other = tmp_path / "llama-server", tmp_path / "evil"
    for b in (allowed, other):
        b.write_text("#!/bin/sh\n")
        b.chmod(0o755)
    link = tmp_path / "current"
    link.symlink_to(allowed)
    return {"models": models, "outside": outside, "allowed": allowed, "other": other,
            "link": link, "tmp": tmp_path}


def judge_for(tree: dict[str, Path], **kwargs: object) -> Judge:
    trusted = LlamaConfig(str(tree["link"]), (("--model", str(tree["models"] / "a.gguf")),
                                              ("--port", "8080")))
    return build_policy(trusted, CATALOG, model_dirs=[str(tree["models"])],
                        **kwargs)  # type: ignore[arg-type]


def refusal(judge: Judge, config: LlamaConfig) -> str | None:
    try:
        judge.check(config, CATALOG)
    except NotAllowed as exc:
        return f"{exc.rule}: {exc}"
    return None


def test_symlinked_binary_swapped_behind_the_link_is_refused(tree: dict[str, Path]) -> None:
    """The link was allowed for what it pointed to; re-pointed at another program, refused."""
    judge = judge_for(tree)
    config = LlamaConfig(str(tree["link"]))
    assert refusal(judge, config) is None
    tree["link"].unlink()
    tree["link"].symlink_to(tree["other"])
    assert "binary not allowed" in (refusal(judge, config) or "")


@pytest.mark.parametrize("value, rule", [
    ("{models}/a.gguf", None),
    ("{models}/../secret.gguf", "file not allowed"),
    ("{models}/link.gguf", "file not allowed"),
    ("{tmp}/secret.gguf", "file not allowed"),
    ("/etc/passwd", "file not allowed"),
])
def test_files_must_resolve_inside_an_allowed_dir(tree: dict[str, Path], value: str,
                                                  rule: str | None) -> None:
    """`..` and symlinks cannot lead a model path out of --allow-model-dir."""
    path = value.format(models=tree["models"], tmp=tree["tmp"])
    got = refusal(judge_for(tree), LlamaConfig(str(tree["allowed"]), (("--model", path),)))
    assert (got is None) if rule is None else (got is not None and rule in got), got


def test_a_lora_list_is_refused_if_one_file_escapes(tree: dict[str, Path]) -> None:
    """Every file of a comma-separated --lora list is checked."""
    value = f"{tree['models']}/a.gguf,{tree['outside']}"
    got = refusal(judge_for(tree), LlamaConfig(str(tree["allowed"]), (("--lora", value),)))
    assert got is not None and got.startswith("file:")


@pytest.mark.parametrize("args, allow, refused", [
    ((("--log-file", "/tmp/x.log"),), (), "flag not allowed: --log-file writes files"),
    ((("--slot-save-path", "/tmp"),), (), "flag not allowed"),
    ((("--host", "0.0.0.0"),), (), "opens network sockets"),
    ((("--log-file", "/tmp/x.log"),), ("--log-file",), None),
    ((("--log-file", "/tmp/x.log"),), ("log-file",), None),
    ((("--parallel", "4"),), (), None),
    ((("--port", "8090"),), (), None),
])
def test_risky_flags_need_allow_flag(tree: dict[str, Path], args: tuple[tuple[str, str], ...],
                                     allow: tuple[str, ...], refused: str | None) -> None:
    """Flags that write or listen are refused unless --allow-flag names them."""
    judge = judge_for(tree, allow_flags=allow)
    got = refusal(judge, LlamaConfig(str(tree["allowed"]), args))
    assert (got is None) if refused is None else (got is not None and refused in got), got


def test_flags_given_at_start_stay_allowed_by_name(tree: dict[str, Path]) -> None:
    """A risky flag on the command line may be changed through the API afterwards."""
    trusted = LlamaConfig(str(tree["allowed"]), (("--host", "127.0.0.1"),))
    judge = build_policy(trusted, CATALOG)
    assert refusal(judge, LlamaConfig(str(tree["allowed"]), (("--host", "127.0.0.2"),))) is None


def test_command_line_values_are_trusted_outside_model_dirs(tree: dict[str, Path]) -> None:
    """A model the command line gave outside --allow-model-dir still runs (operator's)."""
    trusted = LlamaConfig(str(tree["allowed"]), (("--model", str(tree["outside"])),))
    judge = build_policy(trusted, CATALOG, model_dirs=[str(tree["models"])])
    assert refusal(judge, trusted) is None
    changed = LlamaConfig(str(tree["allowed"]), (("--model", str(tree["outside"])),
                                                 ("--parallel", "2")))
    assert refusal(judge, changed) is None


@pytest.mark.parametrize("env, allow, refused", [
    ({"CUDA_VISIBLE_DEVICES": "1"}, None, None),
    ({"LLAMA_ARG_THREADS": "2"}, None, None),
    ({"LD_PRELOAD": "/tmp/x.so"}, None, "never"),
    ({"LD_PRELOAD": "/tmp/x.so"}, ("*",), "never"),
    ({"PATH": "/tmp"}, ("*",), "never"),
    ({"HOME": "/tmp"}, None, "environment variable not allowed"),
    ({"FOO": "1"}, ("FOO",), None),
    ({"CUDA_VISIBLE_DEVICES": "1"}, ("FOO",), "see --allow-env"),
    ({"LLAMA_ARG_LOG_FILE": "/tmp/x"}, None, "flag not allowed: --log-file"),
    ({"LLAMA_ARG_MODEL": "/etc/passwd"}, None, "file not allowed"),
])
def test_environment(tree: dict[str, Path], env: dict[str, str],
                     allow: tuple[str, ...] | None, refused: str | None) -> None:
    """--allow-env limits names; LD_* never; LLAMA_ARG_* are judged as the flag they set."""
    judge = judge_for(tree, allow_env=allow)
    got = refusal(judge, LlamaConfig(str(tree["allowed"]), (), tuple(env.items())))
    assert (got is None) if refused is None else (got is not None and refused in got), got


def test_catalog_knows_which_flag_an_env_var_sets() -> None:
    """The (env: ...) notes of --help map LLAMA_ARG_* names to their flags."""
    assert CATALOG.env_vars["LLAMA_ARG_LOG_FILE"] == "--log-file"


def test_files_of_lists_every_file_a_config_reads() -> None:
    """files_of finds the files under any spelling (the catalog's aliases)."""
    config = LlamaConfig("/b", (("--model", "/m/a.gguf"), ("--lora", "/m/l1,/m/l2"),
                                ("--parallel", "2")))
    assert files_of(config, CATALOG) == [("--model", "/m/a.gguf"), ("--lora", "/m/l1"),
                                         ("--lora", "/m/l2")]
    assert files_of(LlamaConfig("/b", (("-m", "/m/x"),)), FlagCatalog()) == [("-m", "/m/x")]


def test_without_a_policy_everything_passes_but_the_binary(tree: dict[str, Path]) -> None:
    """The default policy confines binaries only: files and env defaults still apply."""
    judge = Judge(Policy(frozenset({str(tree["allowed"])})), os.path.realpath)
    assert refusal(judge, LlamaConfig(str(tree["allowed"]), (("--model", "/x"),))) is None
    assert "binary" in (refusal(judge, LlamaConfig(str(tree["other"]))) or "")


# --- env is part of a config: merged, replaced, stored --------------------------------------

def test_env_merges_like_args() -> None:
    """Later wins, None removes, a whole config replaces the env too."""
    base = LlamaConfig("/b", (), (("A", "1"), ("B", "2")))
    merged = merge_changes([Change(None, (), env=(("A", "9"),)),
                            Change(None, (), env=(("B", None),))])
    assert apply_change(base, merged).env == (("A", "9"),)
    whole = Change.whole(LlamaConfig("/b", (), (("C", "3"),)))
    assert apply_change(base, whole).env == (("C", "3"),)


def test_etcd_codec_round_trips_env() -> None:
    """The etcd codec keeps env; a config without env encodes as before."""
    stored = StoredConfig(LlamaConfig("/b", (("--model", "m"),), (("CUDA_VISIBLE_DEVICES", "1"),)),
                          "t", "me")
    assert decode_config(encode_config(stored), "k") == stored
    plain = StoredConfig(LlamaConfig("/b"), "t", "me")
    assert b"env" not in encode_config(plain)


async def test_toml_store_round_trips_env(tmp_path: Path) -> None:
    """The TOML file keeps env in a [name.env] table and drops it when emptied."""
    store = TomlFileStore(tmp_path / "c.toml")
    config = LlamaConfig("/b", (("--model", "m"),), (("CUDA_VISIBLE_DEVICES", "1"),))
    await store.save("x", StoredConfig(config, "t", "me"))
    assert "[x.env]" in (tmp_path / "c.toml").read_text()
    loaded = await store.load("x")
    assert loaded is not None and loaded.config == config
    await store.save("x", StoredConfig(LlamaConfig("/b", (("--model", "m"),)), "t", "me"))
    assert "env" not in (tmp_path / "c.toml").read_text()


# --- failed token checks ---------------------------------------------------------------------

def test_ten_failures_within_a_second_block_that_address_for_a_second() -> None:
    """The 10th failure within 1 s blocks its address for 1 s; others are not affected."""
    limit = FailureLimit()
    for i in range(9):
        assert not limit.failed("a", 100 + i * 0.1)
    assert not limit.is_blocked("a", 100.85)
    assert limit.failed("a", 100.9)
    assert limit.is_blocked("a", 101.5) and not limit.is_blocked("b", 101.5)
    assert not limit.is_blocked("a", 101.9)


def test_failures_spread_over_more_than_a_second_do_not_block() -> None:
    """Failures older than the window are forgotten."""
    limit = FailureLimit()
    assert not any(limit.failed("a", 100 + i * 0.2) for i in range(30))


def test_addresses_remembered_are_bounded() -> None:
    """A flood of addresses does not grow memory without bound."""
    limit = FailureLimit(max_addresses=100)
    for i in range(1000):
        limit.failed(f"10.0.{i // 256}.{i % 256}", 100.0)
    assert len(limit._failures) <= 100
