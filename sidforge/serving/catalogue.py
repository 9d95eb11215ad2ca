"""The serving catalogue: the run's items plus the items added through the API.

One writer, many readers. :class:`CatalogueState` (inside the single-replica ``catalogue`` deployment)
gives each new item the next id and its unique semantic ID, and keeps an append-only list of what
was added. Readers (retriever and ranker replicas) hold their own copy of the catalogue and catch up
with :meth:`CatalogueState.since`, which hands back a :class:`Delta`: the items after a given size.

Unique IDs follow the run's collision method: with ``digit`` a new item's ID is its codes plus the
number of items that already share them (TIGER's digit); with ``reassign`` it moves to the nearest
free last-level code under its prefix (the tokenizer ranks them), and falls back to a digit only when
that prefix is full (as the tokenize stage does).

Each catalogue process has an ``epoch``. Additions live in memory unless ``serve.catalogue_log`` names
a JSON-lines file, which is appended to and replayed on (re)start, keeping the epoch. A reader that
sees a new epoch (the catalogue restarted without a log, so its additions are gone) drops its own
additions and starts over from the run's items: ids are never reused for different items.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sidforge.platform.schemas import DataError

log = logging.getLogger(__name__)


@dataclass
class Delta:
    """Items ``start .. start + len(codes) - 1`` of one catalogue epoch.

    Attributes:
        epoch: the catalogue process's epoch.
        start: the first item's id (>= the run's item count).
        codes: (M, L) int64 codes.
        sids: the unique IDs (codes, plus a digit when needed).
        vectors: key → (M, D) float32, the keys of :attr:`ServingPlan.needed`.
    """

    epoch: str
    start: int
    codes: np.ndarray
    sids: list[list[int]]
    vectors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def end(self) -> int:
        return self.start + len(self.codes)

    def tail(self, start: int) -> Delta:
        """The part from item ``start`` on (``start`` within this delta)."""
        k = start - self.start
        return Delta(self.epoch, start, self.codes[k:], self.sids[k:], {key: v[k:] for key, v in self.vectors.items()})


class CatalogueState:
    """Ids and unique semantic IDs of new items (single writer); see the module doc.

    Args:
        codes: (N, L) the run's codes (item id = row).
        sids: the run's unique IDs.
        collision: ``digit`` or ``reassign``.
        keys: vector keys stored per new item, with their widths.
        version: the model version (a log written for another one is refused).
        log_path: JSON-lines log of additions ("" = memory only).
    """

    def __init__(self, codes: np.ndarray, sids: list[list[int]], collision: str, keys: dict[str, int],
                 version: str, log_path: str | Path = "") -> None:
        self.base = len(codes)
        self.levels = codes.shape[1]
        self.collision = collision
        self.with_digit = bool(sids) and len(sids[0]) > self.levels
        self.keys = dict(keys)
        self.version = version
        self._shared: dict[bytes, int] = {}  # codes -> items holding them
        self._used: dict[bytes, set[int]] = {}  # prefix -> last-level codes taken under it
        for row in np.asarray(codes, dtype=np.int64):
            self._take(row)
        self.sids: list[list[int]] = []
        # added items' codes and vectors: buffers grown geometrically, rows past len(sids) unused
        self._codes = np.zeros((64, self.levels), dtype=np.int64)
        self._vectors = {k: np.zeros((64, d), dtype=np.float32) for k, d in self.keys.items()}
        self.epoch = uuid.uuid4().hex[:12]
        self.log_path = Path(log_path) if log_path else None
        if self.log_path is not None:
            self._replay()

    @property
    def size(self) -> int:
        """Items in the catalogue (the next new item's id)."""
        return self.base + len(self.sids)

    @property
    def codes(self) -> np.ndarray:
        """(M, L) codes of the added items."""
        return self._codes[: len(self.sids)]

    @property
    def vectors(self) -> dict[str, np.ndarray]:
        """Key → (M, D) vectors of the added items."""
        return {k: v[: len(self.sids)] for k, v in self._vectors.items()}

    def _store(self, rows: np.ndarray, sids: list[list[int]], vectors: dict[str, np.ndarray]) -> None:
        m, new = len(self.sids), len(sids)
        if m + new > len(self._codes):  # grow geometrically: adding one item must not copy all the others
            cap = max(2 * len(self._codes), m + new)
            self._codes = np.concatenate([self._codes[:m], np.zeros((cap - m, self.levels), np.int64)])
            self._vectors = {k: np.concatenate([v[:m], np.zeros((cap - m, v.shape[1]), np.float32)])
                             for k, v in self._vectors.items()}
        self._codes[m : m + new] = rows
        for k, v in vectors.items():
            self._vectors[k][m : m + new] = v
        self.sids += sids

    def _take(self, row: np.ndarray) -> int:
        """Record an item holding ``row``; returns how many held it before (the digit)."""
        key = row.tobytes()
        held = self._shared.get(key, 0)
        self._shared[key] = held + 1
        self._used.setdefault(row[:-1].tobytes(), set()).add(int(row[-1]))
        return held

    def _unique(self, codes: np.ndarray, order: np.ndarray | None) -> tuple[np.ndarray, list[int]]:
        row = np.array(codes, dtype=np.int64)
        if self.collision == "reassign" and not self.with_digit and row.tobytes() in self._shared:
            taken = self._used.get(row[:-1].tobytes(), set())
            free = [int(c) for c in (order if order is not None else []) if int(c) not in taken]
            if free:
                row[-1] = free[0]
        digit = self._take(row)
        if self.with_digit or digit:
            return row, [*row.tolist(), digit]
        return row, row.tolist()

    def add(self, codes: np.ndarray, orders: np.ndarray | None, vectors: list[dict[str, np.ndarray]]
            ) -> list[dict[str, Any]]:
        """Add items; returns ``{"item_id", "codes", "sid"}`` per item, in order."""
        out, rows, sids = [], [], []
        for i, c in enumerate(np.asarray(codes, dtype=np.int64)):
            row, sid = self._unique(c, None if orders is None else orders[i])
            out.append({"item_id": self.size + len(rows), "codes": row.tolist(), "sid": sid})
            rows.append(row)
            sids.append(sid)
        new = {k: np.stack([np.asarray(v[k], dtype=np.float32) for v in vectors]) for k in self.keys}
        if self.log_path is not None:
            self._append(out, new)
        self._store(np.stack(rows), sids, new)
        return out

    def since(self, start: int, epoch: str | None) -> Delta:
        """The items from ``start`` on; everything added when ``epoch`` is not this catalogue's."""
        k = min(max(0, start - self.base), len(self.sids)) if epoch == self.epoch else 0
        m = len(self.sids)
        return Delta(self.epoch, self.base + k, self._codes[k:m].copy(), self.sids[k:],
                     {key: v[k:m].copy() for key, v in self._vectors.items()})

    # -- the log ---------------------------------------------------------------------------------

    def _append(self, items: list[dict[str, Any]], vectors: dict[str, np.ndarray]) -> None:
        assert self.log_path is not None
        with self.log_path.open("a") as fh:
            for i, item in enumerate(items):
                fh.write(json.dumps({**item, "vectors": {k: v[i].tolist() for k, v in vectors.items()}}) + "\n")

    def _replay(self) -> None:
        assert self.log_path is not None
        if not self.log_path.is_file() or self.log_path.stat().st_size == 0:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.write_text(json.dumps({"epoch": self.epoch, "version": self.version,
                                                 "base_items": self.base}) + "\n")
            return
        lines = self.log_path.read_text().splitlines()
        head = json.loads(lines[0])
        if head.get("version") != self.version or head.get("base_items") != self.base:
            raise DataError(f"serve.catalogue_log {self.log_path} holds items added to model {head.get('version')} "
                            f"({head.get('base_items')} items), not {self.version}; move it away to start empty")
        self.epoch = head["epoch"]
        rows, sids, vecs = [], [], {k: [] for k in self.keys}
        for line in lines[1:]:
            if not line.strip():
                continue
            item = json.loads(line)
            row = np.asarray(item["codes"], dtype=np.int64)
            self._take(row)
            rows.append(row)
            sids.append(item["sid"])
            for k in self.keys:
                vecs[k].append(np.asarray(item["vectors"][k], dtype=np.float32))
        if rows:
            self._store(np.stack(rows), sids, {k: np.stack(v) for k, v in vecs.items()})
        log.info("catalogue: replayed %d added items from %s", len(rows), self.log_path)


class Follower:
    """A reader's side of the catalogue: applies deltas in order to something with ``extend``/``reset``.

    Args:
        target: has ``size`` (items it knows), ``extend(delta)`` (append items ``size ..``) and
            ``reset()`` (back to the run's items).
    """

    def __init__(self, target: Any) -> None:
        self.target = target
        self.epoch: str | None = None

    def apply(self, delta: Delta) -> None:
        if delta.epoch != self.epoch:
            if self.epoch is not None:
                log.warning("catalogue restarted (epoch %s -> %s): dropping %d added items", self.epoch,
                            delta.epoch, self.target.size - delta.start)
            self.target.reset()
            self.epoch = delta.epoch
        if delta.end > self.target.size >= delta.start:
            self.target.extend(delta.tail(self.target.size))
