"""The ConfigStore contract: every driver must pass these tests.

A driver's test module subclasses :class:`StoreContract` and provides a ``store`` fixture
(sync or async). If the driver persists anything, it also overrides ``reopen`` to return a
factory of *fresh* store objects over the same backing storage, so the durability test
reads back through a store that shares no state with the one that saved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from corral.core.args import LlamaConfig
from corral.store.base import ConfigStore, StoredConfig

FULL = StoredConfig(
    LlamaConfig(
        "/usr/bin/llama-server",
        (
            ("--model", "/models/with space/ünïcødé 模型.gguf"),
            ("--port", "8081"),
            ("--cont-batching", True),
            ("--alias", "my model"),
            ("--chat-template", 'say "hi" \\ then\ttab'),
            ("-ngl", "99"),
        ),
    ),
    applied_at="2026-11-28T22:00:00+00:00",
    applied_by="host:1234",
)

NAMES = ["default", "my.model", "with space", "ünï", "a]b", 'quo"te', "x" * 60, "0"]


def config(tag: str, *args: tuple[str, str | bool]) -> StoredConfig:
    return StoredConfig(LlamaConfig(f"/opt/{tag}/llama-server", tuple(args)), tag, "test:1")


class StoreContract:
    @pytest.fixture
    def reopen(self, store: ConfigStore) -> Callable[[], ConfigStore]:
        """A factory of fresh stores over the same storage; in-memory drivers reuse one."""
        return lambda: store

    def test_is_a_config_store(self, store: ConfigStore) -> None:
        """The driver is a ConfigStore with a description."""
        assert isinstance(store, ConfigStore)
        assert isinstance(store.description, str) and store.description

    async def test_unknown_name_loads_none(self, store: ConfigStore) -> None:
        """An unknown name loads as None."""
        assert await store.load("nothing-here") is None

    async def test_round_trip_keeps_everything(self, store: ConfigStore) -> None:
        """A saved config loads back equal, stamps included."""
        await store.save("gpt", FULL)
        assert await store.load("gpt") == FULL

    async def test_args_keep_their_order(self, store: ConfigStore) -> None:
        """Args load back in the order they were saved."""
        forward = config("a", ("--z", "1"), ("--a", "2"), ("--m", True), ("-b", "3"))
        backward = config("a", *reversed(forward.config.args))
        await store.save("fwd", forward)
        await store.save("bwd", backward)
        assert (await store.load("fwd")) == forward
        assert (await store.load("bwd")) == backward

    async def test_empty_args_and_stamps(self, store: ConfigStore) -> None:
        """A config with no args and no stamps round-trips."""
        bare = StoredConfig(LlamaConfig("llama-server"))
        await store.save("bare", bare)
        assert await store.load("bare") == bare

    async def test_stamped_now_round_trips(self, store: ConfigStore) -> None:
        """A config stamped now round-trips."""
        stored = StoredConfig.now(FULL.config)
        await store.save("now", stored)
        assert await store.load("now") == stored

    async def test_saving_another_name_keeps_the_first(self, store: ConfigStore) -> None:
        """Saving one name leaves the others as they were."""
        a, b = config("a", ("--port", "1")), config("b", ("--port", "2"))
        await store.save("a", a)
        await store.save("b", b)
        assert await store.load("a") == a
        assert await store.load("b") == b

    async def test_overwrite_replaces_the_whole_config(self, store: ConfigStore) -> None:
        """Overwriting a name replaces its whole config; no old flag lingers."""
        other = config("other", ("--port", "9"))
        await store.save("other", other)
        await store.save("a", config("old", ("--model", "old"), ("--flash-attn", True)))
        new = config("new", ("--port", "2"))
        await store.save("a", new)
        assert await store.load("a") == new  # no flag of the old config lingers
        assert await store.load("other") == other

    async def test_many_names(self, store: ConfigStore) -> None:
        """Many names, awkward ones included, each keep their own config."""
        expected = {
            name: config(f"n{i}", ("--port", str(8000 + i))) for i, name in enumerate(NAMES)
        }
        for name, stored in expected.items():
            await store.save(name, stored)
        for name, stored in expected.items():
            assert await store.load(name) == stored, name

    async def test_concurrent_saves_lose_nothing(self, store: ConfigStore) -> None:
        """Concurrent saves of different names lose none of them."""
        expected = {f"c{i}": config(f"c{i}", ("--seq", str(i))) for i in range(20)}
        await asyncio.gather(*(store.save(name, s) for name, s in expected.items()))
        for name, stored in expected.items():
            assert await store.load(name) == stored, name

    async def test_saved_config_is_visible_to_a_fresh_store(
        self, store: ConfigStore, reopen: Callable[[], ConfigStore]
    ) -> None:
        """A saved config is visible to a freshly opened store."""
        await store.save("gpt", FULL)
        fresh = reopen()
        try:
            assert await fresh.load("gpt") == FULL
            assert await fresh.load("nothing-here") is None
        finally:
            if fresh is not store:
                await fresh.close()
