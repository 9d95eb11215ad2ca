"""The composed Ray Serve application over HTTP (one app for the module, on the session's Ray cluster):
health and version, bad input over the wire, the issue's new-item test, batched concurrent assignment,
and a ranker replica killed under load (no request lost; a replacement is started)."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import socket
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
from api_token import AUTH, TOKEN

from sidforge.serving.plan import resolve

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_run, tmp_path_factory):
    from ray import serve

    from sidforge.serving.app import APP_NAME, compose

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    cfg = dataclasses.replace(tiny_run, serve=dataclasses.replace(tiny_run.serve, token_file=str(token_file), deployments={
        "ranker": {"num_replicas": 2, "num_cpus": 0.1}}))
    plan = resolve(cfg)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(compose(plan), name=APP_NAME, route_prefix="/",
              logging_config={"log_level": "WARNING", "enable_access_log": False})
    yield f"http://127.0.0.1:{port}", plan
    serve.shutdown()


def test_health_version_and_openapi(app):
    url, plan = app
    r = requests.get(f"{url}/healthz", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok", "model_version": plan.version, "catalogue_size": 300}
    v = requests.get(f"{url}/version", timeout=30)
    assert v.headers["x-model-version"] == plan.version and v.json()["stages"]["ranker"]["config_hash"]
    assert "/items/assign" in requests.get(f"{url}/openapi.json", timeout=30).json()["paths"]


@pytest.mark.parametrize("path,body,status,field", [
    ("/rank", {"history": [1], "candidates": [5, 100000]}, 422, "candidates[1]"),
    ("/recommend", {"history": []}, 422, "history"),
    ("/items/assign", {"items": [{"embedding": [0.5] * 3}]}, 422, "items[0].embedding"),
    ("/items/assign", {"items": [{"features": {"content": [0.5] * 3}}]}, 422, "items[0].features.content"),
    ("/items/assign", {"items": [{"embedding": [0.5] * 16}] * 9}, 422, "items"),
    ("/rank", b'{"history": [1], "candidates": [NaN]}', 422, "candidates[0]"),
    ("/rank", b'{"history": [1', 400, "body"),
    ("/rank", b"[" + b"1," * 40_000 + b"1]", 413, "body"),
])
def test_bad_input_over_http_is_a_4xx_and_the_app_keeps_answering(app, path, body, status, field):
    url, plan = app
    if isinstance(body, bytes):
        r = requests.post(url + path, data=body, headers={"content-type": "application/json", **AUTH}, timeout=30)
    else:
        r = requests.post(url + path, json=body, headers=AUTH, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field and r.json()["model_version"] == plan.version
    assert requests.post(f"{url}/rank", json={"history": [1], "candidates": [2]}, timeout=30).status_code == 200


def test_a_new_item_is_recommended_for_a_history_of_its_co_clicked_items(app):
    url, plan = app
    pairs = pq.read_table(plan.run_dir / "prepare" / "cocliks.parquet", columns=["item_a", "item_b"]).to_pandas()
    partners: dict[int, set[int]] = {}
    for a, b in zip(pairs.item_a, pairs.item_b):
        partners.setdefault(int(a), set()).add(int(b))
        partners.setdefault(int(b), set()).add(int(a))
    item = max(partners, key=lambda k: (len(partners[k]), -k))
    history = sorted(partners[item])  # the items the new one will be co-clicked with
    feats = pq.read_table(plan.run_dir / "embed" / "item_embeddings.parquet", columns=["emb_content"])
    x = np.mean([feats.column("emb_content")[i].as_py() for i in history], axis=0)
    r = requests.post(f"{url}/items/assign", json={"items": [{"features": {"content": x.tolist()}}]}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    new = r.json()["items"][0]["item_id"]
    assert new >= plan.num_items
    recs = requests.post(f"{url}/recommend", json={"history": history, "top_k": 25}, timeout=30).json()
    assert new in [i["item_id"] for i in recs["items"]], recs
    assert recs["model_version"] == plan.version
    # and it is a valid history item and candidate everywhere at once
    r = requests.post(f"{url}/rank", json={"history": [new], "candidates": [new, 1]}, timeout=30)
    assert r.status_code == 200 and len(r.json()["scores"]) == 2


def test_concurrent_assignments_are_batched_and_get_distinct_ids(app):
    url, _ = app
    rng = np.random.default_rng(0)

    def one(k: int) -> requests.Response:
        items = [{"features": {"content": rng.normal(size=16).tolist()}} for _ in range(1 + k % 3)]
        return requests.post(f"{url}/items/assign", json={"items": items}, headers=AUTH, timeout=60)

    with cf.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(16)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    ids = [i["item_id"] for r in responses for i in r.json()["items"]]
    assert len(ids) == len(set(ids)) == sum(1 + k % 3 for k in range(16))
    sids = [tuple(i["sid"]) for r in responses for i in r.json()["items"]]
    assert len(set(sids)) == len(sids)


def test_killing_a_ranker_replica_loses_no_request_and_a_replacement_starts(app):
    """Requests on the killed replica are retried on the other one. The controller starts a replacement
    at once; bench/serve_load.py times until it runs (a few seconds here), which this test does not wait for."""
    import ray

    url, _ = app

    def replicas() -> list[str]:
        return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::") and "#ranker#" in a["name"]]

    assert len(replicas()) == 2

    def one(k: int) -> int:
        body = {"history": [k % 300, (k * 7) % 300], "candidates": list(range(100))}
        return requests.post(f"{url}/rank", json=body, timeout=60).status_code

    victim = replicas()[0]
    with cf.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, k) for k in range(60)]
        time.sleep(0.3)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        codes = [f.result() for f in futures]
    assert codes.count(200) == len(codes), codes  # requests on the lost replica were retried on the other
    deadline = time.time() + 30
    while time.time() < deadline and (victim in replicas() or len(replicas()) < 2):
        time.sleep(0.2)
    names = replicas()
    assert victim not in names and len(names) == 2, names
    assert all(one(k) == 200 for k in range(4))


def test_the_token_guards_writes_on_the_live_app(app):
    url, plan = app  # the replicas read the token from serve.token_file themselves
    body = {"items": [{"embedding": [0.5] * 16}]}
    r = requests.post(f"{url}/items/assign", json=body, timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = requests.post(f"{url}/items/assign", json=body, headers={"Authorization": "Bearer a-wrong-token-xxxxx"},
                      timeout=30)
    assert r.status_code == 403 and TOKEN not in r.text
    assert requests.post(f"{url}/items/assign", json=body, headers=AUTH, timeout=30).status_code == 200


def test_fuzzing_the_live_app_finds_no_server_error_and_crashes_no_replica(app):
    """A short schemathesis run over HTTP against the Serve app (the in-process run in test_fuzz_api.py is
    the long one): no 5xx, and every deployment keeps its replicas."""
    import ray
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    url, _ = app

    def replicas() -> list[str]:
        return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["name"].startswith("SERVE_REPLICA::"))

    before = replicas()
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    sent = 0
    for operation in (result.ok() for result in schema.get_all_operations()):
        for mode in GenerationMode:
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def run(case) -> None:
                nonlocal sent
                response = case.call(base_url=url, headers=AUTH, timeout=30)
                sent += 1
                # a 503/504 is the app's own answer to a busy machine (our error body); a 500 is a bug
                busy = response.status_code in (503, 504) and "error" in response.json()
                assert response.status_code < 500 or busy, (case.method, case.path, case.body, response.text)

            try:
                run()
            except Unsatisfiable:
                pass
    assert sent > 60
    assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
    assert [n.rsplit("#", 1)[0] for n in replicas()] == [n.rsplit("#", 1)[0] for n in before]
