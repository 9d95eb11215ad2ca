"""The HTTP API in process (FastAPI's TestClient over :class:`LocalBackend`, no Ray): every kind of bad
input is a 4xx naming the field and the app keeps answering; the model version is on every response;
a new item is assigned, retrievable and rankable at once; the OpenAPI schema states the limits."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from api_token import AUTH, TOKEN
from fastapi.testclient import TestClient

from sidforge.serving.api import LocalBackend, build_api, field_path
from sidforge.serving.auth import Auth
from sidforge.serving.plan import ALIGNED, resolve

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def plan(tiny_run):
    return resolve(tiny_run)


@pytest.fixture(scope="module")
def client(plan):
    with TestClient(build_api(LocalBackend(plan), Auth.from_token(TOKEN)), raise_server_exceptions=False,
                    headers=AUTH) as c:
        yield c


def _features(plan, item: int) -> list[float]:
    table = pq.read_table(plan.run_dir / "embed" / "item_embeddings.parquet", columns=["emb_content"])
    return table.column("emb_content")[item].as_py()


def test_plan_reads_the_tiny_run(plan):
    assert plan.num_items == 300 and plan.dims == {"content": 16, ALIGNED: 16}
    assert plan.tokenizer_space == plan.ranker_space == plan.retrieval_space == (ALIGNED,)
    assert plan.version.startswith("ranker@") and set(plan.stages) >= {"align", "ranker", "tokenize-rqkmeans"}


def test_field_paths_read_like_the_body():
    assert field_path(("body", "items", 0, "features", "text", 3)) == "items[0].features.text[3]"
    assert field_path(("body",)) == "body" and field_path(("query", "x")) == "query.x"


def test_rank_recommend_health_and_version_in_every_response(client, plan):
    r = client.post("/rank", json={"history": [1, 2, 3], "candidates": [4, 5, 6, 7]})
    assert r.status_code == 200
    scores = r.json()["scores"]
    assert len(scores) == 4 and all(0.0 < s < 1.0 for s in scores)
    r2 = client.post("/recommend", json={"history": [1, 2, 3], "top_k": 5})
    items = r2.json()["items"]
    assert r2.status_code == 200 and len(items) == 5 and not {1, 2, 3} & {i["item_id"] for i in items}
    assert [i["score"] for i in items] == sorted((i["score"] for i in items), reverse=True)
    for resp in (r, r2, client.get("/healthz"), client.get("/version"),
                 client.post("/rank", json={"history": []})):
        assert resp.headers["x-model-version"] == plan.version and resp.json()["model_version"] == plan.version
    v = client.get("/version").json()
    assert v["catalogue"]["base_items"] == 300 and v["ranker"] == "ranker" and v["retriever"] == "faiss"


NAN_BODY = '{"items": [{"embedding": [NaN' + ", 0.1" * 15 + "]}]}"
INF_BODY = '{"items": [{"features": {"content": [0.5, -Infinity' + ", 0.1" * 14 + "]}}]}"

BAD: list[tuple[str, str, object, int, str, str]] = [
    # (case, path, json body or raw text, status, field, words in the message)
    ("unknown history id", "/rank", {"history": [1, 99999], "candidates": [2]}, 422, "history[1]", "unknown item id 99999"),
    ("unknown candidate", "/rank", {"history": [1], "candidates": [2, 3, 300]}, 422, "candidates[2]", "unknown item id 300"),
    ("negative id", "/recommend", {"history": [-1]}, 422, "history[0]", "greater than or equal to 0"),
    ("id as text", "/rank", {"history": ["7"], "candidates": [1]}, 422, "history[0]", "integer"),
    ("empty history", "/recommend", {"history": []}, 422, "history", "at least 1"),
    ("over-long history", "/recommend", {"history": [1] * 51}, 422, "history", "at most 50"),
    ("too many candidates", "/rank", {"history": [1], "candidates": [1] * 121}, 422, "candidates", "at most 120"),
    ("top_k above candidates", "/recommend", {"history": [1], "top_k": 41}, 422, "top_k", "less than or equal to 40"),
    ("missing field", "/rank", {"history": [1]}, 422, "candidates", "required"),
    ("unknown field", "/rank", {"history": [1], "candidates": [2], "histroy": [3]}, 422, "histroy", "not permitted"),
    ("wrong embedding width", "/items/assign", {"items": [{"embedding": [0.1] * 15}]}, 422, "items[0].embedding",
     "expected 16 numbers, got 15"),
    ("wrong features width", "/items/assign", {"items": [{"features": {"content": [0.1] * 17}}]}, 422,
     "items[0].features.content", "expected 16"),
    ("unknown modality", "/items/assign", {"items": [{"features": {"text": [0.1] * 16}}]}, 422,
     "items[0].features.text", "unknown modality"),
    ("NaN", "/items/assign", NAN_BODY, 422, "items[0].embedding[0]", "finite"),
    ("Infinity", "/items/assign", INF_BODY, 422, "items[0].features.content[1]", "finite"),
    ("beyond float32", "/items/assign", {"items": [{"embedding": [0.1] * 3 + [1e39] + [0.1] * 12}]}, 422,
     "items[0].embedding", "position 3 is beyond the float32 range"),
    ("two forms at once", "/items/assign", {"items": [{"embedding": [0.1] * 16, "features": {"content": [0.1] * 16}}]},
     422, "items[0]", "exactly one of"),
    ("raw content on a precomputed run", "/items/assign", {"items": [{"content": {"title": "a lamp"}}]}, 422,
     "items[0].content", "precomputed"),
    ("oversized batch", "/items/assign", {"items": [{"embedding": [0.1] * 16}] * 9}, 422, "items", "at most 8"),
    ("malformed JSON", "/rank", '{"history": [1,', 400, "body", "not valid JSON"),
    ("not JSON at all", "/rank", "history=1", 400, "body", "not valid JSON"),
    ("body over the limit", "/rank", json.dumps({"history": [1] * 30_000, "candidates": [1]}), 413, "body", "64 KB"),
]


@pytest.mark.parametrize("case,path,body,status,field,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_naming_the_field(client, plan, case, path, body, status, field, words):
    if isinstance(body, str):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    out = r.json()
    assert out["error"]["field"] == field and words in out["error"]["message"], out
    assert r.headers["x-model-version"] == plan.version
    assert client.get("/healthz").status_code == 200  # still answering


def test_streamed_body_over_the_limit_is_413(client):
    def chunks():
        for _ in range(40):
            yield b" " * 4096

    r = client.post("/rank", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"


def test_a_slow_request_is_a_504_and_a_lost_deployment_a_503(plan):
    import asyncio
    import dataclasses

    from sidforge.serving.errors import Unavailable

    class Slow(LocalBackend):
        async def rank(self, history, candidates):
            await asyncio.sleep(5)
            return []

        async def recommend(self, history, top_k, exclude_history):
            raise Unavailable("the retriever deployment did not answer (ActorDiedError)")

    quick = dataclasses.replace(plan, serve=dataclasses.replace(plan.serve, request_timeout_s=0.2))
    with TestClient(build_api(Slow(quick)), raise_server_exceptions=False) as c:
        r = c.post("/rank", json={"history": [1], "candidates": [2]})
        assert r.status_code == 504 and "0.2 s" in r.json()["error"]["message"]
        r = c.post("/recommend", json={"history": [1]})
        assert r.status_code == 503 and "retriever" in r.json()["error"]["message"]
        assert c.get("/healthz").json()["status"] == "ok"


def test_new_item_is_assigned_retrieved_and_ranked_at_once(plan, one_torch_thread):
    backend = LocalBackend(plan)
    with TestClient(build_api(backend, Auth.from_token(TOKEN)), headers=AUTH) as c:
        history, item = _coclicked(plan)
        x = np.mean([_features(plan, i) for i in history], axis=0)
        r = c.post("/items/assign", json={"items": [{"features": {"content": x.tolist()}},
                                                    {"features": {"content": _features(plan, item)}}]})
        assert r.status_code == 200, r.text
        added = r.json()["items"]
        new = added[0]["item_id"]
        assert [a["item_id"] for a in added] == [300, 301] and r.json()["catalogue_size"] == 302
        assert len(added[0]["sid"]) == 3 and added[0]["sid"][:2] == added[0]["codes"]  # digit IDs: codes + digit
        recs = c.post("/recommend", json={"history": history, "top_k": 25}).json()["items"]
        ids = [x["item_id"] for x in recs]
        assert new in ids
        assert max(recs, key=lambda x: x["retrieval_score"])["item_id"] == new  # nearest to the history
        scores = c.post("/rank", json={"history": [*history, new], "candidates": [new, 301, item]}).json()["scores"]
        assert all(math.isfinite(s) and 0 < s < 1 for s in scores)
    assert backend.catalogue.size == backend.retriever.size == backend.ranker.size == 302


def _coclicked(plan) -> tuple[list[int], int]:
    """The item with the most co-click partners, and those partners (a history of its co-clicked items)."""
    pairs = pq.read_table(plan.run_dir / "prepare" / "cocliks.parquet", columns=["item_a", "item_b"]).to_pandas()
    partners: dict[int, set[int]] = {}
    for a, b in zip(pairs.item_a, pairs.item_b):
        partners.setdefault(int(a), set()).add(int(b))
        partners.setdefault(int(b), set()).add(int(a))
    item = max(partners, key=lambda k: (len(partners[k]), -k))
    return sorted(partners[item]), item


def test_openapi_documents_routes_and_limits(client):
    spec = client.get("/openapi.json").json()
    assert {"/items/assign", "/rank", "/recommend", "/healthz", "/version"} <= set(spec["paths"])
    rank = spec["components"]["schemas"]["RankRequest"]["properties"]
    assert rank["history"]["maxItems"] == 50 and rank["candidates"]["maxItems"] == 120
    assert "422" in spec["paths"]["/rank"]["post"]["responses"]
