"""Write configs through TomlFileStore in a loop, for the store fault tests.

    python tests/store_writer.py PATH NAME FIRST COUNT [--check] [--args N]

Saves ``config_for(NAME, i)`` under NAME for i = FIRST .. FIRST+COUNT-1, printing
``begin i`` before and ``done i`` after each save (flushed), then ``finished``. With
``--check`` it first loads NAME and exits 1 with ``lost ...`` if it does not hold what this
process saved last: NAME has no other writer, so anything else is a lost update.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from corral.core.args import LlamaConfig
from corral.store.base import StoredConfig
from corral.store.toml_file import TomlFileStore


def config_for(name: str, i: int, size: int = 4) -> StoredConfig:
    """Every field depends on i, so a mix of two saves would be visible."""
    args = [(f"--flag-{k}", f"{name}-{i}-{k}-" + "x" * 64) for k in range(size)]
    flags: tuple[tuple[str, str | bool], ...] = (("--seq", str(i)), *args, ("--bare", True))
    return StoredConfig(LlamaConfig(f"/opt/{name}/llama-server-{i}", flags), str(i), name)


def seq_of(stored: StoredConfig | None) -> int | None:
    return None if stored is None else int(stored.applied_at)


async def main(path: Path, name: str, first: int, count: int, check: bool, size: int) -> int:
    store = TomlFileStore(path)
    last = seq_of(await store.load(name)) if check else None
    for i in range(first, first + count):
        if check and (found := seq_of(await store.load(name))) != last:
            print(f"lost {name}: expected {last}, found {found}", flush=True)
            return 1
        print(f"begin {i}", flush=True)
        await store.save(name, config_for(name, i, size))
        print(f"done {i}", flush=True)
        last = i
    print("finished", flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("path", type=Path)
    parser.add_argument("name")
    parser.add_argument("first", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--args", type=int, default=4, help="flags per config besides --seq")
    ns = parser.parse_args()
    sys.exit(asyncio.run(main(ns.path, ns.name, ns.first, ns.count, ns.check, ns.args)))
