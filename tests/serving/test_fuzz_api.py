"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis): valid and invalid
bodies for every operation, with and without the token, never answered with a 5xx; the app keeps
answering after each case. Bounded: ``MAX_EXAMPLES`` per operation and mode (in process, no Ray; the
live Serve app gets a short run in test_serve_app.py)."""

from __future__ import annotations

import pytest
import schemathesis
from api_token import AUTH, TOKEN
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from sidforge.serving.api import LocalBackend, build_api
from sidforge.serving.auth import Auth
from sidforge.serving.plan import resolve

MAX_EXAMPLES = 100
CASES: dict[str, int] = {}


@pytest.fixture(scope="module")
def api(tiny_run):
    return build_api(LocalBackend(resolve(tiny_run)), Auth.from_token(TOKEN))


@pytest.fixture(scope="module")
def operations(api):
    schema = schemathesis.openapi.from_asgi("/openapi.json", api)
    return [result.ok() for result in schema.get_all_operations()]


def _fuzz(operation, mode: GenerationMode, headers: dict[str, str] | None, max_examples: int) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case) -> None:
        response = case.call_and_validate(headers=headers, checks=[not_a_server_error])
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert set(response.json()) == {"model_version", "error"}, response.text  # the documented error body
        key = f"{case.method} {case.path}"
        CASES[key] = CASES.get(key, 0) + 1

    try:
        run()
    except Unsatisfiable:  # no invalid request exists for an operation without parameters (GET /healthz)
        assert mode is GenerationMode.NEGATIVE and not operation.body and not operation.query


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
@pytest.mark.parametrize("token", [True, False], ids=["token", "no-token"])
def test_no_generated_request_gets_a_server_error(operations, mode, token, one_torch_thread):
    for operation in operations:
        _fuzz(operation, mode, AUTH if token else None, MAX_EXAMPLES if token else MAX_EXAMPLES // 4)


def test_the_fuzzing_ran_every_operation(api):
    from fastapi.testclient import TestClient

    ran = {k.split(" ", 1)[1] for k in CASES}
    assert {"/items/assign", "/rank", "/recommend", "/healthz", "/version"} <= ran, CASES
    with TestClient(api) as c:  # and the app still answers afterwards
        assert c.get("/healthz").json()["status"] == "ok"
    print(f"\nschemathesis: {sum(CASES.values())} generated requests: {CASES}")
