"""The main paths against the fake llama-server (fast); the real one repeats them."""

from __future__ import annotations

import os
import signal
import tomllib
from pathlib import Path

import httpx
import pytest

from tests.harness import FAKE, make_fake_model, pid_alive, props, supervisor, wait_for


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_fake_model(tmp_path / "a.gguf")


def test_starts_serves_and_reports_status(tmp_path: Path, model: Path) -> None:
    """The fake starts with the CLI args, serves them, and status and the store report them."""
    with supervisor(tmp_path, FAKE, model, ["-np", "2"]) as sup:
        status = sup.wait_running()
        assert status["port"] == sup.port
        assert status["restarts"] == 0 and status["last_error"] is None
        assert status["config"]["args"]["--parallel"] == "2"
        assert status["config"]["args"]["--model"] == str(model)
        assert props(sup.port)["total_slots"] == 2
        stored = sup.stored()
        assert stored["args"]["--parallel"] == "2"


def test_change_is_applied_and_stored(tmp_path: Path, model: Path) -> None:
    """A POSTed change replaces the server (new pid, old one gone) and is stored."""
    other = make_fake_model(tmp_path / "b.gguf")
    with supervisor(tmp_path, FAKE, model) as sup:
        old_pid = sup.wait_running()["pid"]
        r = sup.post({"-m": str(other), "np": 4})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "applied" and r.json()["restarted"]
        p = props(sup.port)
        assert p["model_path"] == str(other) and p["total_slots"] == 4
        assert sup.llama_pid() != old_pid and not pid_alive(old_pid)
        stored = sup.stored()["args"]
        assert stored["--model"] == str(other) and stored["--parallel"] == "4"


def test_same_config_is_a_noop(tmp_path: Path, model: Path) -> None:
    """A change equal to the running config (other spellings) restarts nothing."""
    with supervisor(tmp_path, FAKE, model, ["-np", "2"]) as sup:
        pid = sup.wait_running()["pid"]
        r = sup.post({"--parallel": 2, "model": str(model)})
        assert r.status_code == 200 and r.json()["restarted"] is False
        assert sup.llama_pid() == pid and sup.status()["generation"] == 1


@pytest.mark.parametrize("args, reason", [
    ({"--no-such-flag": 1}, "--no-such-flag"),
    ({"-m": "/nonexistent/model.gguf"}, "does not exist"),
    ({"binary": "/nonexistent/llama-server"}, "does not exist"),
    ({"binary": "no-such-llama-server"}, "not found on PATH"),
    ({"-cb": "yes please"}, "takes no value"),
    ({"-m": True}, "needs a value"),
])
def test_preflight_rejects_without_touching_the_server(tmp_path: Path, model: Path,
                                                       args: dict, reason: str) -> None:
    """A change that fails the checks is a 422; the server and the store stay as they were."""
    with supervisor(tmp_path, FAKE, model) as sup:
        pid = sup.wait_running()["pid"]
        before = sup.config_file.read_bytes()
        r = sup.post(args)
        assert r.status_code == 422, r.text
        assert reason in r.json()["error"]
        assert sup.llama_pid() == pid and sup.status()["generation"] == 1
        assert sup.config_file.read_bytes() == before


def test_busy_port_is_rejected_in_preflight(tmp_path: Path, model: Path) -> None:
    """A --port someone else listens on is a 422 before anything stops."""
    import socket

    with socket.socket() as busy, supervisor(tmp_path, FAKE, model) as sup:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        pid = sup.wait_running()["pid"]
        r = sup.post({"port": busy.getsockname()[1]})
        assert r.status_code == 422 and "in use" in r.json()["error"]
        assert sup.llama_pid() == pid


def test_failed_start_rolls_back(tmp_path: Path, model: Path) -> None:
    """A new config that exits at start is a 422 with its log; the last good one runs again."""
    with supervisor(tmp_path, FAKE, model) as sup:
        sup.wait_running()
        before = sup.config_file.read_bytes()
        r = sup.post({"--fake-exit-at-start": 3})
        assert r.status_code == 422, r.text
        body = r.json()
        assert "exited with code 3" in body["error"]
        assert any("exiting with 3" in line for line in body["log"])
        status = sup.wait_running()
        assert "--fake-exit-at-start" not in status["config"]["args"]
        assert props(sup.port)["model_path"] == str(model)
        assert sup.config_file.read_bytes() == before


@pytest.mark.timing  # bounded in time, heavy: run alone
def test_never_ready_times_out_and_rolls_back(tmp_path: Path, model: Path) -> None:
    """A new config never ready within --ready-timeout is a 422 and is rolled back."""
    with supervisor(tmp_path, FAKE, model, extra_cli=["--ready-timeout", "1"]) as sup:
        sup.wait_running()
        r = sup.post({"--fake-never-ready": True})
        assert r.status_code == 422
        assert "did not become ready within 1 s" in r.json()["error"]
        assert "--fake-never-ready" not in sup.wait_running()["config"]["args"]


def test_port_change_moves_the_server(tmp_path: Path, model: Path) -> None:
    """A --port change moves llama-server to the new port and off the old one."""
    from tests.harness import free_port

    new_port = free_port()
    with supervisor(tmp_path, FAKE, model) as sup:
        sup.wait_running()
        r = sup.post({"--port": str(new_port)})
        assert r.status_code == 200, r.text
        assert props(new_port)["model_path"] == str(model)
        with pytest.raises(httpx.ConnectError):
            props(sup.port)
        assert sup.status()["port"] == new_port


def test_kill_9_revives_with_same_args(tmp_path: Path, model: Path) -> None:
    """Each SIGKILL of llama-server is followed by a restart with the same config."""
    with supervisor(tmp_path, FAKE, model, ["-np", "3"]) as sup:
        first = sup.wait_running()
        for i in range(5):
            pid = sup.llama_pid()
            os.kill(pid, signal.SIGKILL)
            status = wait_for(lambda p=pid: (s := sup.status())["state"] == "RUNNING"
                              and s["pid"] not in (None, p) and s, 10, "revival")
            assert status["restarts"] == i + 1
            assert status["config"] == first["config"]
            assert props(sup.port)["total_slots"] == 3
        assert "exited with code -9" in sup.status()["last_error"]


def test_sigterm_stops_cleanly(tmp_path: Path, model: Path) -> None:
    """SIGTERM to the supervisor stops llama-server and exits 0."""
    with supervisor(tmp_path, FAKE, model) as sup:
        pid = sup.wait_running()["pid"]
        assert sup.stop(signal.SIGTERM) == 0
        assert not pid_alive(pid)
        assert "supervisor stopped" in sup.log()


def test_supervisor_sigkill_takes_the_child_with_it(tmp_path: Path, model: Path) -> None:
    """SIGKILL of the supervisor takes llama-server with it within 1 s."""
    with supervisor(tmp_path, FAKE, model) as sup:
        pid = sup.wait_running()["pid"]
        sup.kill()
        wait_for(lambda: not pid_alive(pid), 1.0, "llama-server gone after supervisor SIGKILL")


def test_crash_loop_backs_off_then_fatal(tmp_path: Path, model: Path) -> None:
    """A server that always exits backs off, goes FATAL after N starts; a good apply clears it."""
    with supervisor(tmp_path, FAKE, model, ["--fake-exit-at-start", "1"],
                    extra_cli=["--max-start-failures", "3"]) as sup:
        backoff = sup.wait_state("BACKOFF", 20)
        assert backoff["consecutive_failures"] >= 1 and backoff["retry_in_s"] is not None
        fatal = sup.wait_state("FATAL", 30)
        assert fatal["consecutive_failures"] == 3 and fatal["pid"] is None
        assert "exited with code 1" in fatal["last_error"]
        starts = sup.log().count("started llama-server")
        assert starts == 3
        # A valid apply clears FATAL.
        r = sup.post({"--fake-exit-at-start": False})
        assert r.status_code == 200, r.text
        assert sup.wait_running()["consecutive_failures"] == 0


def test_log_reports_loading_progress(tmp_path: Path, model: Path) -> None:
    """A slow load is reported in the log while it lasts."""
    with supervisor(tmp_path, FAKE, model, ["--fake-load-s", "1.8"]) as sup:
        sup.wait_running()
        log = sup.log()
        assert "still loading: 1.0 s elapsed, /health: 503" in log
        assert "is ready after" in log


def test_corrupt_store_is_a_clear_error_and_left_untouched(tmp_path: Path, model: Path) -> None:
    """An unparsable config file stops the start with its path and line, and stays as it was."""
    import subprocess
    import sys

    config = tmp_path / "config.toml"
    config.write_text("[default]\nbinary = \n")
    before = config.read_bytes()
    out = subprocess.run(
        [sys.executable, "-m", "corral", "supervise", "--binary", str(FAKE), "--model",
         str(model), "--config-file", str(config), "--state-dir", str(tmp_path / "s"),
         "--supervisor-addr", "127.0.0.1:0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert str(config) in out.stderr and "line 2" in out.stderr
    assert config.read_bytes() == before


def test_unwritable_store_fails_the_apply_and_keeps_the_stored_config(tmp_path: Path,
                                                                      model: Path) -> None:
    """A change that cannot be stored fails, and the old config runs and stays stored."""
    with supervisor(tmp_path, FAKE, model, ["-np", "2"]) as sup:
        sup.wait_running()
        before = sup.config_file.read_bytes()
        # Root ignores file modes, so make the store's lock path a directory instead.
        lock = sup.config_file.with_name(sup.config_file.name + ".lock")
        lock.unlink()
        lock.mkdir()
        r = sup.post({"-np": 4})
        assert r.status_code in (500, 503), r.text
        assert r.json()["status"] == "failed" and str(lock) in r.json()["error"]
        assert sup.wait_running()["config"]["args"]["--parallel"] == "2"
        assert props(sup.port)["total_slots"] == 2
        assert sup.config_file.read_bytes() == before


def test_two_names_share_one_file(tmp_path: Path, model: Path) -> None:
    """Two supervisors with different --name keep their configs apart in one file."""
    config = tmp_path / "shared.toml"
    store = ["--config-file", str(config)]
    with supervisor(tmp_path, FAKE, model, store_args=[*store, "--name", "alpha"]) as a, \
         supervisor(tmp_path, FAKE, model, store_args=[*store, "--name", "beta"]) as b:
        a.wait_running()
        b.wait_running()
        assert a.post({"-np": 3}).status_code == 200
        assert b.post({"-np": 5}).status_code == 200
        data = tomllib.loads(config.read_text())
        assert data["alpha"]["args"]["--parallel"] == "3"
        assert data["beta"]["args"]["--parallel"] == "5"


def test_binary_by_name_on_path(tmp_path: Path, model: Path) -> None:
    """A binary given by name is found on PATH and reported by its full path."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "llama-server").symlink_to(FAKE)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}"}
    with supervisor(tmp_path, "llama-server", model, env=env) as sup:
        status = sup.wait_running()
        assert status["config"]["binary"] == str(bindir / "llama-server")


def test_stored_config_that_cannot_start_falls_back_to_the_cli(tmp_path: Path,
                                                               model: Path) -> None:
    """A stored config that no longer starts gives way to the command-line config."""
    doomed = make_fake_model(tmp_path / "doomed.gguf")
    state = tmp_path / "state"
    with supervisor(tmp_path, FAKE, model, state_dir=state) as sup:
        sup.wait_running()
        assert sup.post({"-m": str(doomed)}).status_code == 200
        port = sup.port
        sup.stop()
    doomed.unlink()
    assert sup.stored()["args"]["--model"] == str(doomed)
    with supervisor(tmp_path, FAKE, model, port=port, state_dir=state) as sup:
        status = sup.wait_running()
        assert status["config"]["args"]["--model"] == str(model)
        assert "FALLING BACK to the command-line config" in sup.log()
        assert "does not exist" in sup.log()
        # The stored config changes only when another config is applied successfully.
        stored = sup.stored()
        assert stored["args"]["--model"] == str(doomed)
        assert sup.post({"-np": 2}).status_code == 200
        stored = sup.stored()
        assert stored["args"]["--model"] == str(model)


def test_client_commands(tmp_path: Path, model: Path) -> None:
    """corral status, apply and params talk to a running supervisor and print its JSON."""
    import json
    import subprocess
    import sys

    def corral(*args: str) -> tuple[int, dict]:
        out = subprocess.run([sys.executable, "-m", "corral", *args], capture_output=True,
                             text=True, timeout=60)
        return out.returncode, json.loads(out.stdout)

    with supervisor(tmp_path, FAKE, model) as sup:
        sup.wait_running()
        addr = ["--supervisor-addr", f"127.0.0.1:{sup.api_port}"]
        code, status = corral("status", "--json", *addr)
        assert code == 0 and status["state"] == "RUNNING"
        code, applied = corral("apply", *addr, "--", "-np", "3", "-cb")
        assert code == 0 and applied["status"] == "applied"
        assert applied["config"]["args"]["--parallel"] == "3"
        assert applied["config"]["args"]["--cont-batching"] is True
        code, params = corral("params", *addr)
        assert code == 0 and params["config"]["args"]["--parallel"] == "3"
        code, rejected = corral("apply", *addr, "--json", '{"args": {"--nope": 1}}')
        assert code == 1 and rejected["status"] == "rejected"


def test_unreadable_help_accepts_flags_as_given(tmp_path: Path, model: Path) -> None:
    """A binary whose --help cannot be read: flags are accepted as given, with a warning."""
    wrapper = tmp_path / "no-help-llama-server"
    wrapper.write_text(f"""#!/bin/sh
case "$1" in --help) echo "no help here"; exit 0;; esac
exec "{FAKE}" "$@"
""")
    wrapper.chmod(0o755)
    with supervisor(tmp_path, wrapper, model, ["-np", "2"]) as sup:
        status = sup.wait_running()
        assert status["config"]["args"]["-np"] == "2"
        assert "accepting flags as given" in sup.log()
