"""The Ray Serve application: six deployments composed with ``.bind()`` behind a FastAPI ingress.

::

    HTTP ─▶ ingress ─┬─▶ encoder    (raw content → vectors; @serve.batch)        ┐
                     ├─▶ assigner   (vectors → z → codes; @serve.batch)          ├ POST /items/assign
                     ├─▶ catalogue  (one replica: ids, unique IDs, added items)  ┘
                     ├─▶ retriever  (faiss or TIGER beam search)   ─┐ POST /recommend
                     └─▶ ranker     (SaviorRec CTR ranker)         ─┘ POST /rank
                  retriever and ranker replicas follow the catalogue ◀─ long-poll + catch-up on demand

**How added items reach every replica.** The ``catalogue`` deployment is the single writer (exactly
one replica). Retriever and ranker replicas each keep a copy of the catalogue and follow it: a
background long-poll (``catalogue.wait``, at most every :data:`COALESCE_S`, so a burst of additions
arrives as one delta) brings additions within about 0.1 s, and a request that names an item a replica
does not know yet first catches up with ``catalogue.since``. The retriever also receives the largest
catalogue size the ingress has seen and catches up to it, so a client that added an item and then asks
for recommendations through the same ingress always finds it. Limits: additions go through one replica
(a cheap step, not a throughput limit at API rates); while the catalogue is down ``/items/assign``
answers 503 and everything else keeps serving; with several ingress replicas an item added through one
may take up to ~0.1 s to be *retrievable* through another (it is rankable at once); without
``serve.catalogue_log`` a restarted catalogue has lost its additions, and the followers drop theirs
too (new epoch) rather than let two items share an id.

**Failures.** Calls to the retriever, ranker, encoder and assigner are idempotent; when the replica
serving one dies mid-request the ingress retries on another (up to :data:`RETRIES` times), so losing
a replica costs latency, not requests. The catalogue's ``add`` is not retried.

Entry points: :func:`build_app` (an application builder: ``serve run deploy/serve.yaml`` and
``sidforge serve`` use it) and :func:`compose` (from a resolved plan).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from sidforge.platform.config import ServeConfig, load_config
from sidforge.serving.api import build_api, merge, unknown_ids
from sidforge.serving.auth import Auth
from sidforge.serving.catalogue import CatalogueState, Delta, Follower
from sidforge.serving.content import check_items, item_vectors
from sidforge.serving.errors import BadInput, Unavailable
from sidforge.serving.plan import ServingPlan, load_codes, resolve

log = logging.getLogger(__name__)

APP_NAME = "sidforge"
RETRIES = 2
POLL_S = 10.0  # a follower's long-poll; the catalogue answers at once when something was added
COALESCE_S = 0.1  # a follower's pause between polls: additions arriving meanwhile come in one delta

DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "ingress": {"num_replicas": 1, "max_ongoing_requests": 256, "num_cpus": 0.1},
    "encoder": {"num_replicas": 1, "max_ongoing_requests": 64, "num_cpus": 0.2},
    "assigner": {"num_replicas": 1, "max_ongoing_requests": 64, "num_cpus": 0.1},
    "catalogue": {"num_replicas": 1, "max_ongoing_requests": 1024, "num_cpus": 0.05},
    "retriever": {"num_replicas": 1, "max_ongoing_requests": 32, "num_cpus": 0.2},
    "ranker": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4, "max_ongoing_requests": 16,
               "num_cpus": 0.25},
}


def deployment_options(s: ServeConfig, name: str) -> dict[str, Any]:
    """``.options()`` of deployment ``name``: the defaults above, overridden by ``serve.deployments``."""
    given = s.deployments.get(name, {})
    o = {**DEFAULT_OPTIONS[name], **given}
    if "num_replicas" in given and "max_replicas" not in given:  # a fixed count replaces autoscaling
        o.pop("max_replicas", None)
    out: dict[str, Any] = {"name": name, "max_ongoing_requests": int(o["max_ongoing_requests"]),
                           "ray_actor_options": {"num_cpus": float(o["num_cpus"])}}
    if o.get("max_replicas"):
        out["autoscaling_config"] = {"min_replicas": int(o.get("min_replicas", 1)),
                                     "max_replicas": int(o["max_replicas"]),
                                     "target_ongoing_requests": float(o.get("target_ongoing_requests", 2))}
    else:
        out["num_replicas"] = int(o.get("num_replicas", 1))
    if name == "catalogue":  # followers hold long-polls open; do not wait for them on shutdown
        out.update(graceful_shutdown_timeout_s=1.0, graceful_shutdown_wait_loop_s=0.5)
    return out


def _threads(plan: ServingPlan) -> None:
    import torch

    torch.set_num_threads(plan.serve.torch_threads)


# ----------------------------------------------------------------------------------------------
# deployments


@serve.deployment
class Encoder:
    """Raw item content → vectors (the run's encoder), batched across requests."""

    def __init__(self, plan: ServingPlan) -> None:
        from sidforge.serving.content import ContentModel

        _threads(plan)
        self.model = ContentModel(plan)
        self._batch.set_max_batch_size(plan.serve.batch_size)
        self._batch.set_batch_wait_timeout_s(plan.serve.batch_wait_ms / 1000)

    async def encode(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = await self._batch(items)
        if isinstance(out, BadInput):
            raise out
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batch(self, requests: list[list[dict[str, Any]]]) -> list[Any]:
        return _per_request(requests, self.model.check, self.model.vectors)


@serve.deployment
class Assigner:
    """Vectors → z (the run's aligner) → semantic codes (the run's tokenizer), batched across requests."""

    def __init__(self, plan: ServingPlan) -> None:
        from sidforge.serving.content import CodeAssigner

        _threads(plan)
        self.assigner = CodeAssigner(plan)
        self._batch.set_max_batch_size(plan.serve.batch_size)
        self._batch.set_batch_wait_timeout_s(plan.serve.batch_wait_ms / 1000)

    async def assign(self, vectors: list[dict[str, Any]]) -> tuple[Any, Any]:
        self.assigner.check()
        out = await self._batch(vectors)
        if isinstance(out, BadInput):
            raise out
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batch(self, requests: list[list[dict[str, Any]]]) -> list[Any]:
        vectors, codes, order = self.assigner.assign([v for r in requests for v in r])
        out, start = [], 0
        for r in requests:
            end = start + len(r)
            out.append((vectors[start:end], codes[start:end], None if order is None else order[start:end]))
            start = end
        return out


def _per_request(requests: list[list[Any]], check: Callable[[list[Any]], None],
                 compute: Callable[[list[Any]], list[Any]]) -> list[Any]:
    """Run ``compute`` once over the requests that pass ``check``; a failing one gets its BadInput back."""
    results: list[Any] = [None] * len(requests)
    good: list[int] = []
    for i, r in enumerate(requests):
        try:
            check(r)
            good.append(i)
        except BadInput as e:
            results[i] = e
    flat = compute([x for i in good for x in requests[i]]) if good else []
    start = 0
    for i in good:
        results[i] = flat[start : start + len(requests[i])]
        start += len(requests[i])
    return results


@serve.deployment
class Catalogue:
    """The single writer of new items (exactly one replica); followers read deltas from it."""

    def __init__(self, plan: ServingPlan) -> None:
        codes, sids = load_codes(plan)
        self.state = CatalogueState(codes, sids, plan.collision, {k: plan.dims[k] for k in plan.needed},
                                    plan.version, plan.serve.catalogue_log)
        self._changed = asyncio.Event()

    async def add(self, codes: Any, orders: Any, vectors: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
        added = self.state.add(codes, orders, vectors)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return added, self.state.size

    async def since(self, start: int, epoch: str | None) -> Delta:
        return self.state.since(start, epoch)

    async def wait(self, start: int, epoch: str | None, timeout_s: float) -> Delta:
        """:meth:`since`, but held until there is something new (or ``timeout_s`` passed)."""
        if start >= self.state.size and epoch == self.state.epoch:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except TimeoutError:
                pass
        return self.state.since(start, epoch)

    async def info(self) -> dict[str, Any]:
        s = self.state
        return {"size": s.size, "base_items": s.base, "added_items": s.size - s.base, "epoch": s.epoch}


class _Following:
    """A replica's link to the catalogue: a background long-poll, and catch-up on demand."""

    def __init__(self, catalogue: DeploymentHandle, target: Any) -> None:
        self.catalogue = catalogue
        self.follower = Follower(target)
        self.lock = asyncio.Lock()
        self.task: asyncio.Task[None] | None = None

    async def ensure(self, size: int) -> None:
        """Catch up so that at least ``size`` items are known (and start following).

        Raises:
            Unavailable: items beyond the known ones are asked for and the catalogue does not answer
                (requests about known items never wait for the catalogue).
        """
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._follow())
        if self.follower.target.size >= size:
            return
        async with self.lock:
            t = self.follower.target
            if t.size < size:
                try:
                    delta = await self.catalogue.since.remote(t.size, self.follower.epoch)
                except Exception as e:
                    raise Unavailable(f"the catalogue did not answer ({type(e).__name__})") from None
                self.follower.apply(delta)

    async def _follow(self) -> None:
        while True:
            try:
                t = self.follower.target
                delta = await self.catalogue.wait.remote(t.size, self.follower.epoch, POLL_S)
                async with self.lock:
                    self.follower.apply(delta)
                await asyncio.sleep(COALESCE_S)  # requests naming newer items catch up themselves
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the catalogue is restarting: try again shortly
                log.warning("catalogue follower: %s; retrying", e)
                await asyncio.sleep(1.0)


@serve.deployment
class Retriever:
    """Candidates for a history (faiss or generative), following the catalogue."""

    def __init__(self, plan: ServingPlan, catalogue: DeploymentHandle) -> None:
        from sidforge.serving.models import make_retriever

        _threads(plan)
        self.retriever = make_retriever(plan)
        self.following = _Following(catalogue, self.retriever)

    async def retrieve(self, history: list[int], n: int, exclude_history: bool, size: int
                       ) -> tuple[list[int], list[float]]:
        await self.following.ensure(max(size, max(history) + 1))
        if (err := unknown_ids("history", history, self.retriever.size)) is not None:
            raise err
        return self.retriever.retrieve(history, n, exclude_history)


@serve.deployment
class Ranker:
    """The CTR ranker over the run's items and the added ones, following the catalogue."""

    def __init__(self, plan: ServingPlan, catalogue: DeploymentHandle) -> None:
        from sidforge.serving.models import RankerScorer

        _threads(plan)
        self.scorer = RankerScorer(plan)
        self.following = _Following(catalogue, self.scorer)

    async def rank(self, history: list[int], candidates: list[int]) -> list[float]:
        await self.following.ensure(max(max(history), max(candidates)) + 1)
        for field, ids in (("history", history), ("candidates", candidates)):
            if (err := unknown_ids(field, ids, self.scorer.size)) is not None:
                raise err
        return self.scorer.score(history, candidates)


# ----------------------------------------------------------------------------------------------
# the ingress


class HandleBackend:
    """The API's backend inside the ingress: the other deployments through their handles."""

    def __init__(self, plan: ServingPlan, encoder: DeploymentHandle, assigner: DeploymentHandle,
                 catalogue: DeploymentHandle, retriever: DeploymentHandle, ranker: DeploymentHandle) -> None:
        self.plan = plan
        self.encoder, self.assigner, self.catalogue = encoder, assigner, catalogue
        self.retriever, self.ranker = retriever, ranker
        self.size = plan.num_items  # the largest catalogue size this ingress has seen

    async def _call(self, name: str, method: Any, *args: Any, retry: bool = True) -> Any:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        for attempt in range(RETRIES + 1):
            try:
                return await method.remote(*args)
            except BadInput:
                raise
            except BackPressureError:
                raise Unavailable(f"the {name} deployment is overloaded") from None
            except (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError) as e:
                if not retry or attempt == RETRIES:
                    raise Unavailable(f"the {name} deployment did not answer ({type(e).__name__})") from None
                log.warning("%s replica lost mid-request (%s); retrying", name, type(e).__name__)
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    async def check_ids(self, field: str, ids: list[int]) -> None:
        if max(ids) >= self.size:  # maybe added through another ingress replica: ask
            self.size = max(self.size, (await self._call("catalogue", self.catalogue.info)).get("size", 0))
        if (err := unknown_ids(field, ids, self.size)) is not None:
            raise err

    async def assign(self, items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
        check_items(self.plan, items)  # precomputed vectors never reach the encoder

        async def encode(content: list[dict[str, Any]]) -> list[Any]:
            return await self._call("encoder", self.encoder.encode, content)

        vectors = await item_vectors(self.plan, items, encode)
        vectors, codes, orders = await self._call("assigner", self.assigner.assign, vectors)
        added, size = await self._call("catalogue", self.catalogue.add, codes, orders, vectors, retry=False)
        self.size = max(self.size, size)
        return added, size

    async def rank(self, history: list[int], candidates: list[int]) -> list[float]:
        return await self._call("ranker", self.ranker.rank, history, candidates)

    async def recommend(self, history: list[int], top_k: int, exclude_history: bool) -> list[dict[str, Any]]:
        ids, rscores = await self._call("retriever", self.retriever.retrieve, history, self.plan.serve.candidates,
                                        exclude_history, self.size)
        scores = await self._call("ranker", self.ranker.rank, history, ids) if ids else []
        return merge(ids, rscores, scores, top_k)

    async def catalogue_info(self) -> dict[str, Any]:
        info = await self._call("catalogue", self.catalogue.info)
        self.size = max(self.size, info["size"])
        return info


@serve.deployment
@serve.ingress()
class Ingress:
    """The FastAPI ingress (:mod:`sidforge.serving.api`) over the other deployments' handles."""

    def __init__(self, plan: ServingPlan, encoder: DeploymentHandle, assigner: DeploymentHandle,
                 catalogue: DeploymentHandle, retriever: DeploymentHandle, ranker: DeploymentHandle) -> None:
        self.backend = HandleBackend(plan, encoder, assigner, catalogue, retriever, ranker)

    def __serve_build_asgi_app__(self) -> Any:
        return build_api(self.backend)


# ----------------------------------------------------------------------------------------------
# composing


def compose(plan: ServingPlan) -> Any:
    """The application graph over a resolved run (deployment options from ``plan.serve``).

    The API token is read here only to fail early (a missing token file, a short token); each ingress
    replica reads it again itself, so it never travels in the deployments' arguments.
    """
    s = plan.serve
    auth = Auth.from_config(s)
    log.info("API writes %s; reads %s", "need the token" if auth.digest else "are disabled (no token configured)",
             "need the token" if auth.reads else "are open")
    catalogue = Catalogue.options(**deployment_options(s, "catalogue")).bind(plan)
    encoder = Encoder.options(**deployment_options(s, "encoder")).bind(plan)
    assigner = Assigner.options(**deployment_options(s, "assigner")).bind(plan)
    retriever = Retriever.options(**deployment_options(s, "retriever")).bind(plan, catalogue)
    ranker = Ranker.options(**deployment_options(s, "ranker")).bind(plan, catalogue)
    return Ingress.options(**deployment_options(s, "ingress")).bind(plan, encoder, assigner, catalogue, retriever,
                                                                    ranker)


def build_app(args: dict[str, Any] | None = None) -> Any:
    """Application builder (``import_path: sidforge.serving.app:build_app`` in a Serve config).

    Args:
        args: ``config`` (an experiment YAML; default: the built-in defaults), ``run_dir`` (default:
            the config's), ``overrides`` (a list of ``key=value``, as ``--set``).
    """
    args = dict(args or {})
    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = [overrides]
    cfg = load_config(args.get("config") or None, list(overrides))
    return compose(resolve(cfg, args.get("run_dir") or None))


def serve_run(plan: ServingPlan, address: str | None = None, blocking: bool = True) -> str:
    """Deploy on a local embedded cluster (or ``address``) and listen on ``serve.host:port``.

    Returns the base URL; with ``blocking`` it serves until interrupted (Ctrl-C), then shuts Serve down.
    """
    import time

    from sidforge.platform.runtime import init_ray

    s = plan.serve
    url = f"http://{s.host}:{s.port}"
    init_ray(address)
    try:
        serve.start(http_options={"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s + 5})
        serve.run(compose(plan), name=APP_NAME, route_prefix="/",
                  logging_config={"log_level": "WARNING", "enable_access_log": False})
        if not blocking:
            return url
        log.info("serving %s (model %s) at %s; Ctrl-C stops", plan.run_dir, plan.version, url)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping")
    serve.shutdown()
    return url
