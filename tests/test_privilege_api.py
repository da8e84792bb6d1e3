"""Least privilege through the API, against the fake llama-server: every refused change
leaves the server, the store and the config as they were, and names the rule."""

from __future__ import annotations

import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import FAKE, SupervisorProcess, make_fake_model, supervisor
from tests.privilege_helpers import marker_binary, refused


@pytest.fixture
def models(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    make_fake_model(folder / "a.gguf")
    make_fake_model(folder / "b.gguf")
    make_fake_model(tmp_path / "secret.gguf")
    (folder / "escape.gguf").symlink_to(tmp_path / "secret.gguf")
    return folder


@pytest.fixture
def sup(tmp_path: Path, models: Path) -> Iterator[SupervisorProcess]:
    with supervisor(tmp_path, FAKE, models / "a.gguf", ["-np", "2"],
                    extra_cli=["--allow-model-dir", str(models)]) as s:
        s.wait_running()
        yield s


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_posted_binary_that_is_not_allowed_is_never_run(tmp_path: Path,
                                                          sup: SupervisorProcess,
                                                          dry_run: bool) -> None:
    """binary not allowed: 422, and the program never ran, not even for --help."""
    script, marker = marker_binary(tmp_path)
    refused(sup, {"args": {"binary": str(script), "-np": 3}}, "binary not allowed", dry_run)
    assert not marker.exists(), marker.read_text()
    assert "refused: binary not allowed" in sup.log()


def test_an_allowed_binary_runs_until_swapped_behind_its_symlink(tmp_path: Path,
                                                                  models: Path) -> None:
    """--allow-binary LINK allows what LINK points to at start; re-pointed, it is refused
    (and the new target is not run), while the server keeps running the last good config."""
    other = tmp_path / "other-llama"
    shutil.copy(FAKE, other)
    link = tmp_path / "current-llama"
    link.symlink_to(other)
    script, marker = marker_binary(tmp_path)
    with supervisor(tmp_path, FAKE, models / "a.gguf",
                    extra_cli=["--allow-binary", str(link)]) as s:
        s.wait_running()
        r = s.post({"binary": str(link)})
        assert r.status_code == 200, r.text
        assert r.json()["config"]["binary"] == str(link)
        link.unlink()
        link.symlink_to(script)
        refused(s, {"args": {"-np": 3}}, "binary not allowed")
        refused(s, {"args": {"binary": str(link)}}, "binary not allowed")
        assert not marker.exists()


@pytest.mark.parametrize("model, rule", [
    ("{tmp}/secret.gguf", "file not allowed"),
    ("{models}/../secret.gguf", "file not allowed"),
    ("{models}/escape.gguf", "file not allowed"),
])
def test_model_files_must_stay_inside_allow_model_dir(tmp_path: Path, models: Path,
                                                      sup: SupervisorProcess, model: str,
                                                      rule: str) -> None:
    """Escapes by path, by `..` and by symlink out of --allow-model-dir are refused."""
    path = model.format(tmp=tmp_path, models=models)
    refused(sup, {"args": {"-m": path}}, rule)


def test_the_proposals_example_still_works_with_allow_model_dir(models: Path,
                                                                 sup: SupervisorProcess) -> None:
    """-m inside the allowed dir and -np: applied as before."""
    r = sup.post({"-m": str(models / "b.gguf"), "-np": 4})
    assert r.status_code == 200, r.text
    assert sup.stored()["args"]["--model"] == str(models / "b.gguf")


def test_flags_that_write_need_allow_flag(tmp_path: Path, models: Path) -> None:
    """--log-file is refused through the API; with --allow-flag it is applied."""
    log_file = tmp_path / "llama.log"
    with supervisor(tmp_path, FAKE, models / "a.gguf") as s:
        s.wait_running()
        refused(s, {"args": {"--log-file": str(log_file)}}, "flag not allowed: --log-file")
        refused(s, {"args": {"-np": 2}, "env": {"LLAMA_ARG_LOG_FILE": str(log_file)}},
                "flag not allowed: --log-file")
        assert not log_file.exists()
        s.stop()
    with supervisor(tmp_path, FAKE, models / "a.gguf",
                    extra_cli=["--allow-flag", "log-file"]) as s:
        s.wait_running()
        assert s.post({"--log-file": str(log_file)}).status_code == 200
        assert log_file.exists()


def test_flags_given_on_the_command_line_stay_allowed(tmp_path: Path, models: Path) -> None:
    """--slot-save-path given at start may be changed through the API."""
    with supervisor(tmp_path, FAKE, models / "a.gguf",
                    ["--slot-save-path", str(tmp_path)]) as s:
        s.wait_running()
        r = s.post({"--slot-save-path": str(models)})
        assert r.status_code == 200, r.text


def test_env_is_passed_to_llama_server_and_stored(sup: SupervisorProcess) -> None:
    """An allowed env var reaches llama-server's environment and is stored with the config."""
    r = sup.http.post("/v1/params", json={"args": {}, "env": {"CUDA_VISIBLE_DEVICES": "1"}})
    assert r.status_code == 200, r.text
    assert r.json()["config"]["env"] == {"CUDA_VISIBLE_DEVICES": "1"}
    environ = Path(f"/proc/{sup.llama_pid()}/environ").read_bytes().split(b"\0")
    assert b"CUDA_VISIBLE_DEVICES=1" in environ
    assert sup.stored()["env"] == {"CUDA_VISIBLE_DEVICES": "1"}


@pytest.mark.parametrize("env, rule", [
    ({"LD_PRELOAD": "/tmp/evil.so"}, "environment variable not allowed: LD_PRELOAD"),
    ({"HOME": "/tmp"}, "environment variable not allowed: HOME"),
])
def test_env_outside_allow_env_is_refused(sup: SupervisorProcess, env: dict[str, str],
                                          rule: str) -> None:
    """LD_* never; other names only if --allow-env allows them."""
    refused(sup, {"args": {}, "env": env}, rule)


def test_a_stored_config_that_breaks_a_rule_falls_back_loudly(tmp_path: Path,
                                                               models: Path) -> None:
    """A stored config naming a binary not allowed is not run at start: the command line's
    config runs instead, and the log says why."""
    script, marker = marker_binary(tmp_path)
    (tmp_path / "config.toml").write_text(
        f'[default]\nbinary = "{script}"\n[default.args]\n"--model" = "{models}/a.gguf"\n')
    with supervisor(tmp_path, FAKE, models / "a.gguf") as s:
        status = s.wait_running()
        assert status["config"]["binary"] == str(FAKE)
        assert not marker.exists()
        log = s.log()
        assert "FALLING BACK" in log and "binary not allowed" in log
        stored = tomllib.loads((tmp_path / "config.toml").read_text())["default"]
        assert stored["binary"] == str(script), "the stored config is kept, not overwritten"
