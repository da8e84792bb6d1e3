"""Operating without editing JSON, in-process on tests/fakes.py: POST /v1/restart (also out
of FATAL), POST /v1/changes/{id}/revert (from memory or from the audit log), and the SIGHUP
re-read of the stored config; each goes through the controller loop and the audit log."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from fastapi import FastAPI

from corral.api.observe_routes import observe_router
from corral.core.args import Change, LlamaConfig
from corral.core.fit import SwapMode
from corral.observe.audit import AuditLog
from corral.observe.events import LineBus
from corral.store.base import StoredConfig
from corral.supervisor.changes import ChangeRecord, Outcome
from corral.supervisor.operate import Reloader, reload_from_store
from corral.supervisor.settings import Startup
from tests.fakes import Behaviour, Rig, config


def audited(rig: Rig, tmp_path: Path) -> tuple[FastAPI, AuditLog]:
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.listen_to(rig.controller.events)
    app = FastAPI()
    app.include_router(observe_router(rig.controller, LineBus(), audit))
    return app, audit


async def call(rig: Rig, app: FastAPI, method: str, path: str) -> httpx.Response:
    """One request, answered while the fake clock lets the controller work."""
    async def request() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return await http.request(method, path)

    task = asyncio.create_task(request())
    await rig.clock.run_until(task.done, f"{method} {path} answered")
    return task.result()


async def settled(rig: Rig, record: ChangeRecord) -> ChangeRecord:
    await rig.clock.run_until(record.done.done, f"the outcome of {record.id}")
    return record


def np(n: str | None) -> Change:
    return Change(None, (("--parallel", n),))


def count_saves(rig: Rig) -> list[LlamaConfig]:
    saved: list[LlamaConfig] = []
    real = rig.store.save

    async def save(name: str, stored: StoredConfig) -> None:
        saved.append(stored.config)
        await real(name, stored)

    rig.store.save = save  # type: ignore[method-assign]
    return saved


# ---- restart --------------------------------------------------------------------------------


async def test_restart_runs_the_config_in_effect_again(tmp_path: Path) -> None:
    """A new llama-server with the same config; answered like an apply, with the new pid
    and generation; nothing is stored again; the history says who asked."""
    async with Rig() as rig:
        app, audit = audited(rig, tmp_path)
        await rig.until_state("RUNNING")
        old, generation = rig.active, rig.controller.slots.generation
        saves = count_saves(rig)
        r = await call(rig, app, "POST", "/v1/restart")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "applied" and body["restarted"] is True
        assert body["pid"] == rig.active.pid != old.pid
        assert body["generation"] == generation + 1
        assert body["config"]["args"] == config().as_dict()
        assert old.signals[0] == "TERM" and rig.active.config == config()
        assert rig.state == "RUNNING" and saves == []
        (entry,) = [e for e in audit.last(10) if e["kind"] == "change"]
        assert (entry["source"], entry["client"], entry["outcome"]) == (
            "restart", "127.0.0.1", "applied")
        assert entry["diff"] == {}


async def test_restart_clears_fatal(tmp_path: Path) -> None:
    """FATAL waits for a new config; a restart retries the one in effect and runs it."""
    async with Rig() as rig:
        app, _ = audited(rig, tmp_path)
        rig.launcher.behave = lambda c: Behaviour(load_s=0.1, outcome="exit")
        await rig.until_state("FATAL")
        rig.launcher.behave = lambda c: Behaviour()  # whatever failed is fixed now
        r = await call(rig, app, "POST", "/v1/restart")
        assert r.status_code == 200 and r.json()["pid"] == rig.active.pid
        assert rig.state == "RUNNING" and rig.front.mode == "route"
        assert rig.controller.history.consecutive_failures == 0
        assert rig.active.config == config()


async def test_a_restart_that_fails_in_fatal_stays_fatal_and_says_why(tmp_path: Path) -> None:
    """A restart in FATAL whose server exits again is rejected with why; FATAL stays."""
    async with Rig() as rig:
        app, _ = audited(rig, tmp_path)
        rig.launcher.behave = lambda c: Behaviour(load_s=0.1, outcome="exit")
        await rig.until_state("FATAL")
        servers = len(rig.launcher.servers)
        r = await call(rig, app, "POST", "/v1/restart")
        assert r.status_code == 422 and r.json()["status"] == "rejected"
        assert "exited with code 1" in r.json()["error"] and r.json()["pid"] is None
        assert rig.state == "FATAL" and len(rig.launcher.servers) == servers + 1


async def test_restart_start_first_keeps_the_old_server_serving() -> None:
    """With start-first the new server loads beside the old one: requests are never held."""
    async with Rig(swap=SwapMode.START_FIRST) as rig:
        await rig.until_state("RUNNING")
        old = rig.active
        calls_before = len(rig.front.calls)
        record = await settled(rig, rig.controller.restart())
        assert record.outcome is Outcome.APPLIED and record.strategy == "start-first"
        assert ("hold",) not in rig.front.calls[calls_before:]
        assert rig.front.routed_to == rig.active.pid != old.pid


# ---- revert ---------------------------------------------------------------------------------


async def test_revert_applies_the_config_before_the_change(tmp_path: Path) -> None:
    """Reverting a change applies and stores the config before it, audited as a revert."""
    async with Rig() as rig:
        app, audit = audited(rig, tmp_path)
        await rig.until_state("RUNNING")
        record = await settled(rig, rig.controller.submit(np("4"), client="10.0.0.1"))
        assert record.outcome is Outcome.APPLIED
        r = await call(rig, app, "POST", f"/v1/changes/{record.id}/revert")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "applied" and r.json()["config"]["args"] == config().as_dict()
        assert rig.controller.last_good == config() and rig.active.config == config()
        assert (await rig.store.load("default")).config == config()  # type: ignore[union-attr]
        newest = audit.last(1)[0]
        assert (newest["source"], newest["outcome"]) == ("revert", "applied")
        assert newest["diff"] == {"--parallel": ["4", None]}


async def test_revert_reads_the_audit_log_once_the_supervisor_forgot(tmp_path: Path) -> None:
    """After a restart of the supervisor its memory is empty: the audit log has the
    config that was in effect before the change."""
    async with Rig() as rig:
        _, audit = audited(rig, tmp_path)
        await rig.until_state("RUNNING")
        record = await settled(rig, rig.controller.submit(np("4")))
        after = rig.controller.last_good
    async with Rig(Startup(after)) as rig:
        app, audit = audited(rig, tmp_path)
        await rig.until_state("RUNNING")
        assert rig.controller.record(record.id) is None
        r = await call(rig, app, "POST", f"/v1/changes/{record.id}/revert")
        assert r.status_code == 200, r.text
        assert rig.active.config == config()


async def test_revert_unknown_pending_and_refused(tmp_path: Path) -> None:
    """404 for an unknown change, 409 for one not applied yet, 422 when the old config no
    longer passes the checks (and the refusal is audited)."""
    async with Rig() as rig:
        app, audit = audited(rig, tmp_path)
        await rig.until_state("RUNNING")
        assert (await call(rig, app, "POST", "/v1/changes/c99/revert")).status_code == 404
        pending = rig.controller.submit(np("2"))
        r = await call(rig, app, "POST", f"/v1/changes/{pending.id}/revert")
        assert r.status_code == 409  # answered before its batch was taken
        assert "not been applied" in r.json()["error"]
        await settled(rig, pending)
        rig.checks.bad_models.add("a.gguf")
        r = await call(rig, app, "POST", f"/v1/changes/{pending.id}/revert")
        assert r.status_code == 422 and "does not exist" in r.json()["error"]
        assert rig.controller.last_good.get("--parallel") == "2"
        refused = audit.last(1)[0]
        assert refused["kind"] == "refused" and refused["request"] == {"revert": pending.id}


# ---- SIGHUP: re-read the stored config ------------------------------------------------------


async def test_reload_submits_the_stored_config_as_a_whole(tmp_path: Path) -> None:
    """A hand edit of the stored config is applied through the normal transaction; flags
    the edit removed are gone; the same config again changes nothing."""
    async with Rig(Startup(config(parallel="2"), persist_when_ready=True)) as rig:
        _, audit = audited(rig, tmp_path)
        await rig.until_state("RUNNING")
        edited = config("b.gguf")  # -np removed, another model
        await rig.store.save("default", StoredConfig(edited))
        record = await reload_from_store(rig.controller, audit)
        assert record is not None and record.source == "reload"
        await settled(rig, record)
        assert record.outcome is Outcome.APPLIED
        assert rig.controller.last_good == edited and rig.active.config == edited
        assert await reload_from_store(rig.controller, audit) is None
        assert audit.last(1)[0]["diff"] == {"--model": ["a.gguf", "b.gguf"],
                                             "--parallel": ["2", None]}


async def test_reload_of_a_refused_config_keeps_the_running_one(tmp_path: Path) -> None:
    """A SIGHUP reload of a config the checks refuse keeps the running one, audited as refused."""
    async with Rig() as rig:
        _, audit = audited(rig, tmp_path)
        await rig.until_state("RUNNING")
        rig.checks.bad_models.add("gone.gguf")
        await rig.store.save("default", StoredConfig(config("gone.gguf")))
        assert await reload_from_store(rig.controller, audit) is None
        assert rig.controller.last_good == config()
        refused = audit.last(1)[0]
        assert refused["kind"] == "refused" and refused["client"] == "SIGHUP"
        assert rig.controller.events.tail(1)[0].kind == "refused"  # metrics count it
        assert "gone.gguf" in refused["error"]


async def test_reloader_runs_each_requested_read() -> None:
    """The signal handler only asks; the Reloader task reads the store and submits."""
    async with Rig() as rig:
        await rig.until_state("RUNNING")
        reloader = Reloader(rig.controller)
        task = asyncio.create_task(reloader.run())
        try:
            await rig.store.save("default", StoredConfig(config("c.gguf")))
            reloader.request()
            reloader.request()  # folded into the same read
            await rig.clock.run_until(lambda: rig.controller.last_good == config("c.gguf")
                                      and rig.state == "RUNNING", "the stored config running")
            assert reloader.reloads == 1
        finally:
            task.cancel()
            await asyncio.wait({task})


async def test_start_up_is_in_the_history(tmp_path: Path) -> None:
    """The config the supervisor started with is the history's first line."""
    startup = Startup(config("stored.gguf"), config("cli.gguf"))
    async with Rig(startup) as rig:
        _, audit = audited(rig, tmp_path)
        rig.launcher.behave = lambda c: Behaviour(
            outcome="exit" if c.get("--model") == "stored.gguf" else "ready")
        await rig.until_state("RUNNING")
        (entry,) = audit.last(5)
        assert (entry["kind"], entry["source"], entry["outcome"]) == (
            "start-up", "start-up", "applied")
        assert entry["diff"] == {"--model": ["stored.gguf", "cli.gguf"]}
        assert "exited with code 1" in entry["error"]
