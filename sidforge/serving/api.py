"""The HTTP API (FastAPI): request and response bodies, validation, limits and error answers.

:func:`build_api` makes the app over a :class:`Backend`: :class:`LocalBackend` runs every model in
this process (request-validation tests, the benchmark's in-process floor), and the Serve ingress
(:mod:`sidforge.serving.app`) passes one that calls the other deployments through their handles.

Errors never leave as a bare 500 for bad input. Every error body is
``{"model_version", "error": {"field", "message"}}`` with the field as a path into the request body:

- 400: the body is not JSON;
- 401 / 403: no bearer token / not the right one, on a write endpoint (and on reads with
  ``serve.auth_reads``), checked before the body is read (:mod:`sidforge.serving.auth`);
- 413: the body exceeds ``serve.max_body_kb``;
- 422: a field is missing, of the wrong type, out of range (an unknown item id, an empty or too long
  history, too many candidates or items, a vector of the wrong width, NaN or infinity); a list over
  its limit names the limit (``serve.max_history``, ``serve.max_candidates``, ``serve.max_items``);
- 503: a deployment the request needs is unavailable (replica lost twice, overloaded);
- 504: the request ran past ``serve.request_timeout_s``.

Every response carries the model version: in the body and in the ``x-model-version`` header.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from sidforge.serving.auth import Auth, AuthGate
from sidforge.serving.errors import BadInput, Unavailable
from sidforge.serving.plan import ServingPlan

log = logging.getLogger(__name__)

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
Finite = Annotated[float, Field(allow_inf_nan=False)]
ItemId = Annotated[int, Field(ge=0, strict=True, description="an item id of the catalogue")]
MAX_VECTOR = 16_384  # widest vector a request may carry (any run's embeddings are narrower)
MAX_TEXT = 4_000
# request lists and the serve setting that caps each (named in the 422 answer)
LIMITS = {"history": "max_history", "candidates": "max_candidates", "items": "max_items"}
# declares the scheme in the OpenAPI schema; the check itself is AuthGate's, before the body is read
BEARER = HTTPBearer(auto_error=False, description="the API token (serve.token_env / serve.token_file)")


# ----------------------------------------------------------------------------------------------
# bodies


class ItemContent(BaseModel):
    """Item content rendered with the run's text template (``embed.text_template``)."""

    model_config = ConfigDict(extra="forbid")
    title: str | None = Field(None, max_length=MAX_TEXT)
    text: str | None = Field(None, max_length=MAX_TEXT)
    categories: list[Annotated[str, Field(max_length=MAX_TEXT)]] | None = Field(None, max_length=64)
    brand: str | None = Field(None, max_length=MAX_TEXT)


class NewItem(BaseModel):
    """One new item: exactly one of ``content``, ``features`` or ``embedding``."""

    model_config = ConfigDict(extra="forbid")
    content: ItemContent | None = Field(None, description="raw content, encoded by the run's encoder")
    features: dict[str, Annotated[list[Finite], Field(max_length=MAX_VECTOR)]] | None = Field(
        None, max_length=8, description="embed-space vectors per modality (e.g. {'text': [384 floats]})")
    embedding: Annotated[list[Finite], Field(max_length=MAX_VECTOR)] | None = Field(
        None, description="the co-click aligned embedding z (runs with an aligner)")

    @model_validator(mode="after")
    def _one_form(self) -> NewItem:
        given = [name for name in ("content", "features", "embedding") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of content, features or embedding (got {', '.join(given) or 'none'})")
        return self


class AssignedItem(BaseModel):
    item_id: int = Field(description="the new item's id (use it in /rank and /recommend)")
    codes: list[int] = Field(description="semantic codes, one per level")
    sid: list[int] = Field(description="the unique semantic ID (codes, plus a collision digit when needed)")


class AssignResponse(BaseModel):
    model_version: str
    catalogue_size: int
    items: list[AssignedItem]


class RankResponse(BaseModel):
    model_version: str
    scores: list[float] = Field(description="pCTR of each candidate, in the order given")


class Recommendation(BaseModel):
    item_id: int
    score: float = Field(description="the ranker's pCTR")
    retrieval_score: float = Field(description="the retriever's score (cosine, or log-probability)")


class RecommendResponse(BaseModel):
    model_version: str
    retriever: str
    items: list[Recommendation]


class HealthResponse(BaseModel):
    status: str = Field(description="ok, or degraded when the catalogue does not answer (assignment is "
                                    "unavailable; ranking and recommending known items still work)")
    model_version: str
    catalogue_size: int | None


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    model_version: str
    error: ErrorDetail


def request_models(plan: ServingPlan) -> tuple[type[BaseModel], type[BaseModel], type[BaseModel]]:
    """The request bodies with this server's limits (so the OpenAPI schema states them)."""
    s = plan.serve
    History = Annotated[list[ItemId], Field(min_length=1, max_length=s.max_history,
                                            description="item ids, oldest first")]

    class AssignRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        items: list[NewItem] = Field(min_length=1, max_length=s.max_items)

    class RankRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        history: History
        candidates: list[ItemId] = Field(min_length=1, max_length=s.max_candidates)

    class RecommendRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        history: History
        top_k: int = Field(s.top_k, ge=1, le=s.candidates, strict=True)
        exclude_history: bool = Field(True, description="leave the history's items out of the list")

    return AssignRequest, RankRequest, RecommendRequest


# ----------------------------------------------------------------------------------------------
# the backend contract


class Backend(Protocol):
    """What the routes call; the in-process and the Serve implementations share it."""

    plan: ServingPlan

    async def check_ids(self, field: str, ids: list[int]) -> None: ...
    async def assign(self, items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]: ...
    async def rank(self, history: list[int], candidates: list[int]) -> list[float]: ...
    async def recommend(self, history: list[int], top_k: int, exclude_history: bool) -> list[dict[str, Any]]: ...
    async def catalogue_info(self) -> dict[str, Any]: ...


def unknown_ids(field: str, ids: list[int], size: int) -> BadInput | None:
    bad = [i for i, x in enumerate(ids) if x >= size]
    if not bad:
        return None
    return BadInput(f"{field}[{bad[0]}]", f"unknown item id {ids[bad[0]]}; the catalogue has {size} items "
                    f"(ids 0..{size - 1}){f' and {len(bad) - 1} more unknown' if len(bad) > 1 else ''}")


class LocalBackend:
    """Every model in this process (tests, the benchmark floor); same answers as the Serve app."""

    def __init__(self, plan: ServingPlan, load_encoder: bool = True) -> None:
        from sidforge.serving.catalogue import CatalogueState, Follower
        from sidforge.serving.content import CodeAssigner, ContentModel
        from sidforge.serving.models import RankerScorer, make_retriever
        from sidforge.serving.plan import load_codes

        self.plan = plan
        self.content = ContentModel(plan, load_encoder=load_encoder)
        self.assigner = CodeAssigner(plan)
        codes, sids = load_codes(plan)
        self.catalogue = CatalogueState(codes, sids, plan.collision, {k: plan.dims[k] for k in plan.needed},
                                        plan.version, plan.serve.catalogue_log)
        self.retriever = make_retriever(plan)
        self.ranker = RankerScorer(plan)
        self.followers = [Follower(self.retriever), Follower(self.ranker)]
        self._sync()

    def _sync(self) -> None:
        for f in self.followers:
            f.apply(self.catalogue.since(f.target.size, f.epoch))

    async def check_ids(self, field: str, ids: list[int]) -> None:
        if (err := unknown_ids(field, ids, self.catalogue.size)) is not None:
            raise err

    async def assign(self, items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
        from sidforge.serving.content import check_items, item_vectors

        self.assigner.check()
        check_items(self.plan, items)

        async def encode(content: list[dict[str, Any]]) -> list[Any]:
            return self.content.vectors(content)

        vectors, codes, orders = self.assigner.assign(await item_vectors(self.plan, items, encode))
        added = self.catalogue.add(codes, orders, vectors)
        self._sync()
        return added, self.catalogue.size

    async def rank(self, history: list[int], candidates: list[int]) -> list[float]:
        return self.ranker.score(history, candidates)

    async def recommend(self, history: list[int], top_k: int, exclude_history: bool) -> list[dict[str, Any]]:
        ids, rscores = self.retriever.retrieve(history, self.plan.serve.candidates, exclude_history)
        return merge(ids, rscores, self.ranker.score(history, ids) if ids else [], top_k)

    async def catalogue_info(self) -> dict[str, Any]:
        c = self.catalogue
        return {"size": c.size, "base_items": c.base, "added_items": c.size - c.base, "epoch": c.epoch}


def merge(ids: list[int], retrieval: list[float], scores: list[float], top_k: int) -> list[dict[str, Any]]:
    """Retrieved items ordered by the ranker's score, the best ``top_k``."""
    order = sorted(range(len(ids)), key=lambda k: -scores[k])[:top_k]
    return [{"item_id": ids[k], "score": scores[k], "retrieval_score": retrieval[k]} for k in order]


# ----------------------------------------------------------------------------------------------
# the app


def body_type(model: type[BaseModel]) -> Callable[[F], F]:
    """Give a route's ``body`` parameter a model class built at run time (annotations here are strings)."""

    def mark(fn: F) -> F:
        fn.__annotations__ = {**fn.__annotations__, "body": model}
        return fn

    return mark


def too_large(max_bytes: int) -> str:
    return f"the body exceeds {max_bytes // 1024} KB (serve.max_body_kb)"


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """``("body", "items", 0, "features", "text", 3)`` → ``items[0].features.text[3]``."""
    out = ""
    for part in list(loc)[1:] if loc and loc[0] == "body" else list(loc):
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


class _TooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(413)


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes`` (declared, or counted as it streams in)."""

    def __init__(self, app: Any, max_bytes: int, version: str) -> None:
        self.app, self.max_bytes, self.version = app, max_bytes, version

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            body = {"model_version": self.version, "error": {"field": "body", "message": too_large(self.max_bytes)}}
            return await JSONResponse(body, 413)(scope, receive, send)
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge()
            return message

        await self.app(scope, limited, send)


class VersionHeader:
    """ASGI middleware: the ``x-model-version`` header on every response."""

    def __init__(self, app: Any, version: str) -> None:
        self.app, self.header = app, (b"x-model-version", version.encode())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_header(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, with_header)


def build_api(backend: Backend, auth: Auth | None = None) -> FastAPI:
    """The FastAPI app over ``backend`` (see the module doc for the routes' contract).

    Args:
        backend: where the models run.
        auth: the API token check (default: read from ``serve.token_env`` / ``serve.token_file`` here,
            in the process that answers requests).
    """
    plan = backend.plan
    s = plan.serve
    auth = Auth.from_config(s) if auth is None else auth
    version = plan.version
    AssignRequest, RankRequest, RecommendRequest = request_models(plan)
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse, "description": text} for code, text in (
            (400, "the body is not JSON"), (401, "no bearer token"), (403, "the token is not valid here"),
            (413, "the body is too large"),
            (422, "a field is invalid (named in error.field)"), (503, "a deployment is unavailable"),
            (504, "the request timed out"))}
    app = FastAPI(title="sidforge", version=version, description=(
        "Semantic-ID assignment, retrieval and ranking over one sidforge run. Every response carries the "
        "model version (body `model_version`, header `x-model-version`)."))

    def error(status: int, field: str, message: str) -> JSONResponse:
        return JSONResponse({"model_version": version, "error": {"field": field, "message": message}}, status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            reason = (first.get("ctx") or {}).get("error", "malformed")
            return error(400, "body", f"not valid JSON ({reason} at position {first['loc'][-1]})")
        message = first.get("msg", "invalid").removeprefix("Value error, ")
        loc = [p for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "too_long" and len(loc) == 1 and loc[0] in LIMITS:
            name = LIMITS[loc[0]]
            message = f"{message} (the limit is serve.{name}={getattr(s, name)})"
        return error(422, field_path(first.get("loc", ())), message)

    @app.exception_handler(BadInput)
    async def _bad(_: Request, exc: BadInput) -> JSONResponse:
        return error(exc.status, exc.field, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own answers (a body that is not UTF-8, an unknown route, a wrong method) in our error shape
        field = "body" if exc.status_code == 400 else ""
        return error(exc.status_code, field, str(exc.detail))

    @app.exception_handler(_TooLarge)
    async def _large(_: Request, exc: _TooLarge) -> JSONResponse:
        return error(413, "body", too_large(s.max_body_kb * 1024))

    @app.exception_handler(Unavailable)
    async def _unavailable(_: Request, exc: Unavailable) -> JSONResponse:
        return error(503, "", f"{exc}; retry shortly")

    @app.exception_handler(TimeoutError)
    async def _timeout(_: Request, exc: TimeoutError) -> JSONResponse:
        return error(504, "", f"the request took longer than {s.request_timeout_s} s (serve.request_timeout_s)")

    async def deadline(work: Awaitable[T]) -> T:
        return await asyncio.wait_for(work, s.request_timeout_s)

    @app.post("/items/assign", response_model=AssignResponse, responses=errors, tags=["items"],
              summary="Assign semantic IDs to new items and add them to the catalogue (needs the token)",
              dependencies=[Security(BEARER)])
    @body_type(AssignRequest)
    async def assign(body: Any) -> dict[str, Any]:
        items = [item.model_dump(exclude_none=True) for item in body.items]
        added, size = await deadline(backend.assign(items))
        return {"model_version": version, "catalogue_size": size, "items": added}

    reads = [Security(BEARER)] if auth.reads else []

    @app.post("/rank", response_model=RankResponse, responses=errors, tags=["ranking"],
              summary="Score candidates for a history with the CTR ranker", dependencies=reads)
    @body_type(RankRequest)
    async def rank(body: Any) -> dict[str, Any]:
        async def work() -> list[float]:
            await backend.check_ids("history", body.history)
            await backend.check_ids("candidates", body.candidates)
            return await backend.rank(body.history, body.candidates)

        scores = await deadline(work())
        return {"model_version": version, "scores": [s if math.isfinite(s) else 0.0 for s in scores]}

    @app.post("/recommend", response_model=RecommendResponse, responses=errors, tags=["ranking"],
              summary="Retrieve candidates for a history, rank them, return the top K", dependencies=reads)
    @body_type(RecommendRequest)
    async def recommend(body: Any) -> dict[str, Any]:
        async def work() -> list[dict[str, Any]]:
            await backend.check_ids("history", body.history)
            return await backend.recommend(body.history, body.top_k, body.exclude_history)

        items = await deadline(work())
        return {"model_version": version, "retriever": s.retriever, "items": items}

    @app.get("/healthz", response_model=HealthResponse, tags=["service"])
    async def healthz() -> dict[str, Any]:
        try:
            info = await asyncio.wait_for(backend.catalogue_info(), min(2.0, s.request_timeout_s))
        except (Unavailable, TimeoutError):
            return {"status": "degraded", "model_version": version, "catalogue_size": None}
        return {"status": "ok", "model_version": version, "catalogue_size": info["size"]}

    @app.get("/version", tags=["service"], summary="The model version, the stages it comes from, the catalogue",
             dependencies=reads)
    async def get_version() -> dict[str, Any]:
        info = await deadline(backend.catalogue_info())
        return {"model_version": version, "run_dir": str(plan.run_dir), "ranker": plan.ranker_dir.name,
                "sids": plan.sids_dir.name, "retriever": s.retriever, "stages": plan.stages,
                "spaces": {"tokenizer": plan.tokenizer_space, "ranker": plan.ranker_space,
                           "retrieval": plan.retrieval_space},
                "catalogue": info}

    async def refuse(status: int, message: str, scope: Any, receive: Any, send: Any) -> None:
        headers = {"www-authenticate": "Bearer"} if status == 401 else None
        await JSONResponse({"model_version": version, "error": {"field": "authorization", "message": message}},
                           status, headers=headers)(scope, receive, send)

    app.add_middleware(BodyLimit, max_bytes=s.max_body_kb * 1024, version=version)
    app.add_middleware(AuthGate, auth=auth, refuse=refuse)  # outside the body limit: checked first
    app.add_middleware(VersionHeader, version=version)
    return app
