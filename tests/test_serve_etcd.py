"""corral serve with its catalog in etcd (real etcd, fake llama-server): every config under
/corral/configs/ is a model, /corral/serve/<name> its serve table, and a write takes effect
without a signal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures_etcd import EtcdServer
from tests.harness import FAKE, make_fake_model, wait_for
from tests.serve_helpers import serving

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(120)]


def config_json(tmp: Path, name: str, *args: str) -> str:
    model = make_fake_model(tmp / f"{name}.gguf")
    pairs = [list(p) for p in zip(args[::2], args[1::2], strict=True)]
    return json.dumps({"binary": str(FAKE), "args": [["--model", str(model)], *pairs]})


def test_the_catalog_follows_etcd(tmp_path: Path, etcd_server: EtcdServer) -> None:
    """Models from etcd, an alias from /corral/serve/; a put of a new config restarts the
    loaded model with it, a new key is a new model, a deleted one is gone; the config that
    ran is stored back under its name."""
    etcd_server.etcdctl("put", "/corral/configs/alpha", config_json(tmp_path, "alpha"))
    etcd_server.etcdctl("put", "/corral/configs/beta", config_json(tmp_path, "beta"))
    etcd_server.etcdctl("put", "/corral/serve/alpha", '{"aliases": ["a"]}')
    with serving(tmp_path, FAKE, extra=["--etcd", etcd_server.addr]) as s:
        ids = [(m["id"], m["aliases"]) for m in s.client.get("/v1/models").json()["data"]]
        assert ids == [("alpha", ["a"]), ("beta", [])]
        assert s.complete("a").status_code == 200
        first = s.model("alpha")["pid"]
        etcd_server.etcdctl("put", "/corral/configs/alpha",
                            config_json(tmp_path, "alpha", "-c", "2048"))
        wait_for(lambda: s.model("alpha")["pid"] not in (None, first)
                 and s.starts("2048") == 1, 20, "alpha restarted with -c 2048")
        etcd_server.etcdctl("put", "/corral/configs/gamma", config_json(tmp_path, "gamma"))
        etcd_server.etcdctl("del", "/corral/configs/beta")
        wait_for(lambda: [m["id"] for m in s.status()["models"]] == ["alpha", "gamma"], 10,
                 "gamma in, beta out")
        assert s.complete("gamma").status_code == 200
        assert s.complete("beta").status_code == 404
        stored = json.loads(etcd_server.etcdctl("get", "--print-value-only",
                                                "/corral/configs/alpha").strip())
        assert ["--ctx-size", "2048"] in stored["args"] or ["-c", "2048"] in stored["args"]
