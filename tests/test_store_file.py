"""The TOML file driver: the store contract, plus what only a file can get wrong."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import stat
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from corral.core.args import LlamaConfig
from corral.errors import StoreCorrupt, StoreUnavailable
from corral.store.base import StoredConfig
from corral.store.toml_file import TomlFileStore
from tests.store_contract import FULL, StoreContract, config

HAND_EDITED = """\
# Corral configs. Edited by hand; keep this comment.
[gpt]  # the big one
binary = "/usr/bin/llama-server"
applied_at = "2026-11-28T22:00:00+00:00"
applied_by = "host:1234"

[gpt.args]
"--model" = "/models/a.gguf"   # moved here last week
"--port" = 8081
"--temp" = 0.7
"--top-k" = 40.0
"--cont-batching" = true
"--mlock" = false
"-ngl" = "99"

# a spare
[spare]
binary = "llama-server"
"""


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "corral" / "config.toml"  # the parent does not exist yet


class TestTomlFileStore(StoreContract):
    @pytest.fixture
    async def store(self, path: Path) -> AsyncIterator[TomlFileStore]:
        store = TomlFileStore(path)
        yield store
        await store.close()

    @pytest.fixture
    def reopen(self, path: Path) -> Callable[[], TomlFileStore]:
        return lambda: TomlFileStore(path)


def hand_edited(path: Path, text: str = HAND_EDITED) -> TomlFileStore:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return TomlFileStore(path)


# Small sync helpers: a test peeking at a tiny file does not need a worker thread.
def text_of(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def bytes_of(path: Path) -> bytes:
    return path.read_bytes()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_description_names_the_file(path: Path) -> None:
    """The file store's description names its path."""
    assert str(path) in TomlFileStore(path).description


async def test_file_looks_like_the_documented_format(path: Path) -> None:
    """A saved config is a [name] table with an [name.args] table of flags, as documented."""
    stored = config("a", ("--model", "/models/a.gguf"), ("--port", "8081"), ("-cb", True))
    await TomlFileStore(path).save("gpt", stored)
    text = text_of(path)
    assert "[gpt]\n" in text and "[gpt.args]\n" in text
    assert '"--model" = "/models/a.gguf"\n' in text and '"-cb" = true\n' in text
    table = tomllib.loads(text)["gpt"]
    assert table == {
        "binary": "/opt/a/llama-server",
        "applied_at": "a",
        "applied_by": "test:1",
        "args": {"--model": "/models/a.gguf", "--port": "8081", "-cb": True},
    }
    assert list(table["args"]) == ["--model", "--port", "-cb"]


async def test_names_that_need_quoting_are_quoted(path: Path) -> None:
    """A name with a dot is a quoted table name, not nested tables."""
    await TomlFileStore(path).save("my.model", FULL)
    text = text_of(path)
    assert '["my.model"]' in text
    assert set(tomllib.loads(text)) == {"my.model"}


async def test_hand_edited_values_are_read_as_flags(path: Path) -> None:
    """Hand-written numbers, booleans and floats load as flags."""
    loaded = await hand_edited(path).load("gpt")
    assert loaded is not None
    assert loaded.config.args == (
        ("--model", "/models/a.gguf"),
        ("--port", "8081"),  # an int becomes a string
        ("--temp", "0.7"),
        ("--top-k", "40"),  # as a JSON 40.0 would
        ("--cont-batching", True),  # true is a bare flag, false means absent
        ("-ngl", "99"),
    )
    assert await TomlFileStore(path).load("spare") == StoredConfig(LlamaConfig("llama-server"))


async def test_bare_toml_datetime_is_read_as_text(path: Path) -> None:
    """A bare TOML datetime in applied_at loads as text."""
    store = hand_edited(path, '[a]\nbinary = "x"\napplied_at = 2026-11-28T22:00:00+00:00\n')
    loaded = await store.load("a")
    assert loaded is not None and loaded.applied_at == "2026-11-28T22:00:00+00:00"


async def test_comments_and_other_tables_survive_a_save(path: Path) -> None:
    """Saving a new name keeps every hand-written line and table."""
    store = hand_edited(path)
    await store.save("new", FULL)
    await store.save("new", FULL)
    text = text_of(path)
    for line in HAND_EDITED.splitlines():
        assert line in text  # every line, comments included, is still there
    assert await store.load("new") == FULL
    assert list(tomllib.loads(text)) == ["gpt", "spare", "new"]


async def test_overwriting_a_name_keeps_its_place_and_the_rest(path: Path) -> None:
    """Overwriting a name keeps its place in the file and everything around it."""
    store = hand_edited(path)
    await store.save("gpt", FULL)
    text = text_of(path)
    assert text.startswith("# Corral configs. Edited by hand; keep this comment.\n")
    assert "# a spare" in text
    assert list(tomllib.loads(text)) == ["gpt", "spare"]
    assert await store.load("gpt") == FULL


CORRUPT = {
    "syntax": '[gpt]\nbinary = "/usr/bin/llama-server\n',
    "duplicate key": '[gpt]\nbinary = "a"\nbinary = "b"\n',
    "duplicate table": '[gpt]\nbinary = "a"\n[gpt]\nbinary = "b"\n',
}


@pytest.mark.parametrize("text", CORRUPT.values(), ids=CORRUPT.keys())
async def test_corrupt_file_is_reported_and_never_overwritten(path: Path, text: str) -> None:
    """A corrupt file is StoreCorrupt naming it, and a save never overwrites it."""
    store = hand_edited(path, text)
    before = bytes_of(path)
    with pytest.raises(StoreCorrupt, match=re.escape(str(path))):
        await store.load("gpt")
    with pytest.raises(StoreCorrupt, match=re.escape(str(path))):
        await store.save("other", FULL)
    assert bytes_of(path) == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.toml", "config.toml.lock"]


async def test_syntax_error_names_line_and_column(path: Path) -> None:
    """A TOML syntax error names its line and column."""
    with pytest.raises(StoreCorrupt, match=r"line 2 col"):
        await hand_edited(path, CORRUPT["syntax"]).load("gpt")


def test_file_that_is_not_utf8_is_corrupt(path: Path) -> None:
    """A file that is not UTF-8 is corrupt and never overwritten."""
    path.parent.mkdir(parents=True)
    path.write_bytes(b'[gpt]\nbinary = "\xff\xfe"\n')
    with pytest.raises(StoreCorrupt, match="UTF-8"):
        asyncio.run(TomlFileStore(path).load("gpt"))
    with pytest.raises(StoreCorrupt):
        asyncio.run(TomlFileStore(path).save("gpt", FULL))
    assert bytes_of(path) == b'[gpt]\nbinary = "\xff\xfe"\n'


BAD_SHAPES = {
    "no binary": '[gpt]\n[gpt.args]\n"--port" = "1"\n',
    "binary not a string": "[gpt]\nbinary = 3\n",
    "empty binary": '[gpt]\nbinary = ""\n',
    "args not a table": '[gpt]\nbinary = "x"\nargs = "--port 1"\n',
    "value is an array": '[gpt]\nbinary = "x"\n[gpt.args]\n"--lora" = ["a", "b"]\n',
    "name is not a table": 'gpt = "x"\n',
    "stamp not a string": '[gpt]\nbinary = "x"\napplied_by = 7\n',
}


@pytest.mark.parametrize("text", BAD_SHAPES.values(), ids=BAD_SHAPES.keys())
async def test_badly_shaped_table_is_corrupt_and_named(path: Path, text: str) -> None:
    """A badly shaped table is corrupt by name; the other names still load and save."""
    store = hand_edited(path, text + '\n[fine]\nbinary = "y"\n')
    with pytest.raises(StoreCorrupt, match=rf"{re.escape(str(path))}.*'gpt'"):
        await store.load("gpt")
    # Other names in the same file still work, and saving them keeps the bad table as is.
    assert await store.load("fine") == StoredConfig(LlamaConfig("y"))
    await store.save("fine", FULL)
    assert text in text_of(path)


async def test_parent_is_a_file_is_unavailable(tmp_path: Path) -> None:
    """A path under a regular file is StoreUnavailable, for load and save."""
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "config.toml"
    with pytest.raises(StoreUnavailable, match=rf"{re.escape(str(path))}.*Not a directory"):
        await TomlFileStore(path).save("gpt", FULL)
    with pytest.raises(StoreUnavailable, match="Not a directory"):
        await TomlFileStore(path).load("gpt")


async def test_path_is_a_directory_is_unavailable(tmp_path: Path) -> None:
    """A path that is a directory is StoreUnavailable, for load and save."""
    store = TomlFileStore(tmp_path)
    with pytest.raises(StoreUnavailable, match=rf"{re.escape(str(tmp_path))}.*Is a directory"):
        await store.save("gpt", FULL)
    with pytest.raises(StoreUnavailable, match="Is a directory"):
        await store.load("gpt")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_is_unavailable(tmp_path: Path) -> None:
    """A save into a read-only directory is StoreUnavailable."""
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(StoreUnavailable, match="Permission denied"):
            asyncio.run(TomlFileStore(tmp_path / "config.toml").save("gpt", FULL))
    finally:
        tmp_path.chmod(0o700)


def test_new_file_is_private_and_an_existing_mode_is_kept(path: Path) -> None:
    """A new file is 0600 in a 0700 directory; an existing file keeps its mode."""
    asyncio.run(TomlFileStore(path).save("gpt", FULL))
    assert mode_of(path) == 0o600
    assert mode_of(path.parent) == 0o700
    path.chmod(0o640)
    asyncio.run(TomlFileStore(path).save("gpt", FULL))
    assert mode_of(path) == 0o640


async def test_loading_creates_nothing(path: Path) -> None:
    """Loading from a missing file creates neither it nor its directory."""
    assert await TomlFileStore(path).load("gpt") is None
    assert not path.parent.exists()


async def test_leftover_temp_files_are_harmless(path: Path) -> None:
    """A temp file left by a killed save does not disturb the next save."""
    store = hand_edited(path)
    (path.parent / ".config.toml.dead.tmp").write_text('[gpt]\nbinary = "half-writ')
    await store.save("gpt", FULL)
    assert await TomlFileStore(path).load("gpt") == FULL


async def test_symlinked_file_is_followed_not_replaced(tmp_path: Path) -> None:
    """A symlinked config file is written through, and stays a symlink."""
    target = tmp_path / "dotfiles" / "corral.toml"
    store = hand_edited(target)
    link = tmp_path / "config.toml"
    link.symlink_to(target)
    await TomlFileStore(link).save("new", FULL)
    assert link.is_symlink()
    assert await store.load("new") == FULL


CHILD_FDS = """
import os
for n in range(3, 256):
    try:
        print(os.readlink(f"/proc/self/fd/{n}"))
    except OSError:
        pass
print("listed")
"""


async def test_lock_fd_is_close_on_exec(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock file's descriptor is not inherited by child processes."""
    real_flock = fcntl.flock
    seen: list[tuple[str, bool, str]] = []

    def spy(fd: int, operation: int) -> None:
        real_flock(fd, operation)
        # While the lock is held, even a child started with close_fds=False must not get it.
        child = subprocess.run(
            [sys.executable, "-c", CHILD_FDS], close_fds=False, capture_output=True, text=True
        )
        cloexec = bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
        seen.append((os.readlink(f"/proc/self/fd/{fd}"), cloexec, child.stdout))

    monkeypatch.setattr(fcntl, "flock", spy)
    await TomlFileStore(path).save("gpt", FULL)
    assert len(seen) == 1
    lock_path, cloexec, child_fds = seen[0]
    assert lock_path == f"{path}.lock"
    assert cloexec
    assert "listed" in child_fds and lock_path not in child_fds


async def test_save_waits_for_the_lock_file(path: Path) -> None:
    """A save waits while another process holds the lock file."""
    store = hand_edited(path)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another supervisor is mid-save
        saving = asyncio.create_task(store.save("new", FULL))
        done, _ = await asyncio.wait([saving], timeout=0.3)
        assert not done, "save went ahead without the lock"
    finally:
        os.close(fd)
    await asyncio.wait_for(saving, timeout=10)
    assert await store.load("new") == FULL


async def test_saving_a_hand_edited_table_keeps_its_comments(path: Path) -> None:
    """Changing flags of a hand-edited table keeps its comments and order."""
    store = hand_edited(path)
    loaded = await store.load("gpt")
    assert loaded is not None
    # What an apply produces: same order, one flag changed, one removed, one appended.
    args = dict(loaded.config.args)
    args["--port"] = "9090"
    del args["--temp"]
    args["--flash-attn"] = True
    changed = StoredConfig(LlamaConfig("/usr/bin/llama-server", tuple(args.items())), "t", "h:1")
    await store.save("gpt", changed)
    text = text_of(path)
    assert "[gpt]  # the big one\n" in text
    assert '"--model" = "/models/a.gguf"   # moved here last week\n' in text
    assert '"--flash-attn" = true\n\n# a spare\n[spare]\n' in text  # still heads [spare]
    assert "--temp" not in text
    assert await TomlFileStore(path).load("gpt") == changed
    assert await store.load("spare") == StoredConfig(LlamaConfig("llama-server"))


async def test_reordered_args_are_rewritten_in_the_new_order(path: Path) -> None:
    """Args saved in a new order are rewritten in that order."""
    store = hand_edited(path)
    flipped = config("x", ("-ngl", "1"), ("--model", "/m"))
    await store.save("gpt", flipped)
    text = text_of(path)
    assert list(tomllib.loads(text)["gpt"]["args"]) == ["-ngl", "--model"]
    assert "\n# a spare\n[spare]\n" in text
    assert await store.load("gpt") == flipped
