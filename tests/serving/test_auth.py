"""Access control and limits of the HTTP API (in process, no Ray): the token's sources, the write and read
checks (401/403 before the body is read, no detail, never logged), every limit answered with its status
and its name before any model work, and the loopback-only default."""

from __future__ import annotations

import logging

import pytest
from api_token import AUTH, TOKEN
from fastapi.testclient import TestClient

from sidforge.platform.config import ConfigError, ServeConfig
from sidforge.serving.api import LocalBackend, build_api
from sidforge.serving.auth import Auth, AuthError, read_token
from sidforge.serving.plan import resolve

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NEW_ITEM = {"items": [{"embedding": [0.1] * 16}]}


@pytest.fixture(scope="module")
def plan(tiny_run):
    return resolve(tiny_run)


class Spy(LocalBackend):
    """LocalBackend that counts the model calls, to show a refused request reached none."""

    def __init__(self, plan) -> None:
        super().__init__(plan)
        self.calls = 0

    async def assign(self, *a, **k):
        self.calls += 1
        return await super().assign(*a, **k)

    async def rank(self, *a, **k):
        self.calls += 1
        return await super().rank(*a, **k)

    async def recommend(self, *a, **k):
        self.calls += 1
        return await super().recommend(*a, **k)

    async def check_ids(self, *a, **k):
        self.calls += 1
        return await super().check_ids(*a, **k)


def _client(plan, auth: Auth) -> tuple[TestClient, Spy]:
    backend = Spy(plan)
    return TestClient(build_api(backend, auth), raise_server_exceptions=False), backend


# ----------------------------------------------------------------------------------------------
# where the token comes from


def test_the_token_comes_from_the_environment_or_a_file_never_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_TOKEN", TOKEN)
    assert read_token(ServeConfig(token_env="MY_TOKEN")) == TOKEN
    monkeypatch.delenv("MY_TOKEN")
    assert read_token(ServeConfig(token_env="MY_TOKEN")) is None
    secret = tmp_path / "token"
    secret.write_text(f"  {TOKEN}\n")
    assert read_token(ServeConfig(token_file=str(secret))) == TOKEN  # the file wins, stripped
    with pytest.raises(ConfigError, match="token_file"):
        read_token(ServeConfig(token_file=str(tmp_path / "missing")))
    secret.write_text("short")
    with pytest.raises(ConfigError, match="at least 16"):
        read_token(ServeConfig(token_file=str(secret)))
    assert not any("token" == f.lower() for f in ServeConfig.__dataclass_fields__)  # no field holds a token
    with pytest.raises(ConfigError, match="auth_reads"):
        Auth.from_config(ServeConfig(auth_reads=True, token_env="UNSET_TOKEN_VARIABLE"))


def test_check_matrix():
    auth = Auth.from_token(TOKEN)
    auth.check(f"Bearer {TOKEN}", write=True)
    auth.check(None, write=False)  # reads open by default
    for header, status in ((None, 401), ("", 401), (f"Basic {TOKEN}", 401), ("Bearer ", 401),
                           ("Bearer wrong-token-0123456789", 403), (f"Bearer {TOKEN}x", 403), (f"Bearer {TOKEN[:-1]}", 403)):
        with pytest.raises(AuthError) as e:
            auth.check(header, write=True)
        assert e.value.status == status and TOKEN not in e.value.message
    with pytest.raises(AuthError) as e:
        Auth.from_token(None).check(f"Bearer {TOKEN}", write=True)
    assert e.value.status == 403 and "disabled" in e.value.message
    with pytest.raises(AuthError):
        Auth.from_token(TOKEN, reads=True).check(None, write=False)


# ----------------------------------------------------------------------------------------------
# over HTTP


def test_the_write_endpoint_refuses_a_missing_and_a_wrong_token_and_accepts_the_right_one(plan, caplog):
    client, backend = _client(plan, Auth.from_token(TOKEN))
    with client, caplog.at_level(logging.DEBUG):
        r = client.post("/items/assign", json=NEW_ITEM)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["field"] == "authorization" and r.json()["model_version"] == plan.version
        r = client.post("/items/assign", json=NEW_ITEM, headers={"Authorization": "Bearer not-the-token-at-all"})
        assert r.status_code == 403 and "not valid" in r.json()["error"]["message"]
        assert backend.calls == 0 and backend.catalogue.size == plan.num_items  # nothing reached a model
        # checked before the body is read: no token and a malformed or oversized body is still a 401
        assert client.post("/items/assign", content=b"{not json", headers={"content-type": "application/json"}
                           ).status_code == 401
        assert client.post("/items/assign", content=b"x" * (65 * 1024)).status_code == 401
        r = client.post("/items/assign", json=NEW_ITEM, headers=AUTH)
        assert r.status_code == 200 and r.json()["catalogue_size"] == plan.num_items + 1
    assert TOKEN not in caplog.text and TOKEN not in r.text


def test_reads_are_open_by_default_and_need_the_token_with_auth_reads(plan):
    client, _ = _client(plan, Auth.from_token(TOKEN))
    with client:
        assert client.post("/rank", json={"history": [1, 2], "candidates": [3]}).status_code == 200
        assert client.get("/openapi.json").status_code == 200
    client, backend = _client(plan, Auth.from_token(TOKEN, reads=True))
    reads = [("post", "/rank", {"history": [1, 2], "candidates": [3]}), ("post", "/recommend", {"history": [1, 2]}),
             ("get", "/version", None), ("get", "/openapi.json", None), ("get", "/docs", None)]
    with client:
        for method, path, body in reads:
            kwargs = {"json": body} if body else {}
            assert getattr(client, method)(path, **kwargs).status_code == 401, path
            assert getattr(client, method)(path, headers={"Authorization": "Bearer wrong-but-long-enough"},
                                           **kwargs).status_code == 403, path
            assert getattr(client, method)(path, headers=AUTH, **kwargs).status_code == 200, path
        assert client.get("/healthz").status_code == 200  # probes stay open


def test_a_server_without_a_token_refuses_every_write(plan):
    client, backend = _client(plan, Auth.from_token(None))
    with client:
        r = client.post("/items/assign", json=NEW_ITEM, headers=AUTH)
        assert r.status_code == 403 and "without an API token" in r.json()["error"]["message"]
        assert client.post("/rank", json={"history": [1], "candidates": [2]}).status_code == 200
    assert backend.catalogue.size == plan.num_items  # nothing was added


@pytest.mark.parametrize("path,body,status,limit", [
    ("/rank", {"history": list(range(51)), "candidates": [1]}, 422, "serve.max_history=50"),
    ("/recommend", {"history": list(range(51))}, 422, "serve.max_history=50"),
    ("/rank", {"history": [1], "candidates": list(range(121))}, 422, "serve.max_candidates=120"),
    ("/items/assign", {"items": [{"embedding": [0.1] * 16}] * 9}, 422, "serve.max_items=8"),
    ("/rank", {"history": [1], "candidates": [1] * 40_000}, 413, "serve.max_body_kb"),
])
def test_every_limit_is_enforced_before_model_work_and_named(plan, path, body, status, limit):
    client, backend = _client(plan, Auth.from_token(TOKEN))
    with client:
        r = client.post(path, json=body, headers=AUTH)
    assert r.status_code == status and limit in r.json()["error"]["message"], r.text
    assert backend.calls == 0


def test_the_api_listens_on_loopback_unless_exposed_on_purpose():
    for host in ("127.0.0.1", "localhost", "::1"):
        ServeConfig(host=host)
    with pytest.raises(ConfigError, match="serve.expose"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="0.0.0.0", expose=True).host == "0.0.0.0"
