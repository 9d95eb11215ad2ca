"""Where benchmark data lives, and how it gets there.

The data directory holds one folder per benchmark (``<data_dir>/amazon-beauty-2014/…``). It is the
``--data-dir`` flag when given, else ``SIDFORGE_DATA_DIR``, else a user cache
(``$XDG_CACHE_HOME/sidforge/data``, by default ``~/.cache/sidforge/data``).

:data:`BENCHMARKS` lists the public benchmarks sidforge knows, each file pinned to a commit of the
authors' GitHub repository and to a sha256. :func:`pull` downloads a benchmark into the data
directory and verifies every byte before a file takes its final name, so an interrupted or corrupted
download never looks like data. Air-gapped sites point ``mirror`` (or ``SIDFORGE_DATA_MIRROR``) at a
copy laid out as ``{mirror}/{benchmark}/{file}`` (``http(s)://`` or ``file://``).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

DATA_DIR_ENV = "SIDFORGE_DATA_DIR"
MIRROR_ENV = "SIDFORGE_DATA_MIRROR"
PROVENANCE_FILE = "PROVENANCE.md"

Source = Literal["s3rec", "recbole", "recbole-mm", "lcrec"]
_SOURCES = ("s3rec", "recbole", "recbole-mm", "lcrec")
_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 60.0
# First line of the PROVENANCE.md that pull() writes; a PROVENANCE.md without it is someone else's.
_PROVENANCE_MARKER = "<!-- written by sidforge.platform.datasets.pull -->"


class UnknownBenchmark(ValueError):
    """A benchmark name that is not in :data:`BENCHMARKS`."""


class DownloadError(RuntimeError):
    """A file could not be downloaded, or its bytes are not the ones the registry pins.

    Attributes:
        path: the file's name inside the benchmark folder.
        url: where it was fetched from.
        expected_sha256: the registry's hash.
        actual_sha256: the hash of the bytes received, or ``None`` when the request failed.
    """

    def __init__(
        self, path: str, url: str, expected_sha256: str, actual_sha256: str | None, reason: str
    ) -> None:
        self.path = path
        self.url = url
        self.expected_sha256 = expected_sha256
        self.actual_sha256 = actual_sha256
        actual = actual_sha256 if actual_sha256 is not None else "none (nothing complete was received)"
        super().__init__(
            f"download of {path!r} from {url} failed: {reason}; expected sha256 {expected_sha256}, "
            f"actual sha256 {actual}. Nothing was written. Retry, or pass a mirror "
            f"(--mirror / {MIRROR_ENV}) that serves {{mirror}}/<benchmark>/{path}."
        )


@dataclass(frozen=True)
class RemoteFile:
    """One file of a benchmark.

    Attributes:
        path: name inside the benchmark folder (a plain relative path, may differ from upstream's).
        url: pinned public URL (a raw GitHub URL at a fixed commit).
        sha256: lowercase hex sha256 of the file's bytes.
        size: size in bytes.
    """

    path: str
    url: str
    sha256: str
    size: int

    def __post_init__(self) -> None:
        parts = Path(self.path).parts
        if not self.path or Path(self.path).is_absolute() or ".." in parts or "\\" in self.path:
            raise ValueError(f"RemoteFile.path must be a relative path inside the folder, got {self.path!r}")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"RemoteFile.sha256 of {self.path!r} must be 64 lowercase hex digits")
        if self.size < 0:
            raise ValueError(f"RemoteFile.size of {self.path!r} must be >= 0, got {self.size}")


@dataclass(frozen=True)
class Benchmark:
    """A public benchmark: its files and where they come from.

    Attributes:
        name: folder name under the data directory, also the registry key.
        description: one line for ``sidforge data list``.
        source: the adapter that reads the folder (``data.source`` in a config).
        files: every file that :func:`pull` downloads.
        license_note: licences of the upstream repositories and of the underlying data.
    """

    name: str
    description: str
    source: Source
    files: tuple[RemoteFile, ...]
    license_note: str

    def __post_init__(self) -> None:
        if self.source not in _SOURCES:
            raise ValueError(f"Benchmark {self.name!r}: source must be one of {_SOURCES}, got {self.source!r}")
        if not self.files:
            raise ValueError(f"Benchmark {self.name!r} has no files")
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError(f"Benchmark {self.name!r} lists a file twice: {sorted(paths)}")
        if PROVENANCE_FILE in paths:
            raise ValueError(f"Benchmark {self.name!r}: {PROVENANCE_FILE} is written by pull(), not downloaded")


# ----------------------------------------------------------------------------------------------
# Registry. Hashes and sizes measured on the copies described in each folder's PROVENANCE.md.

_RAW = "https://raw.githubusercontent.com"
_S3REC = f"{_RAW}/aHuiWang/CIKM2020-S3Rec/49a890d"
_P5ID = f"{_RAW}/Wenyueh/LLM-RecSys-ID/2200ad9"
_LLMSEQ = f"{_RAW}/dh-r/LLM-Sequential-Recommendation/6464b39064f369b251580c63edbf635de0934101"
_LETTER = f"{_RAW}/HonghuiBao2000/LETTER/8d0154e"
_COWPIREC = f"{_RAW}/ysh-1998/CoWPiRec/db47560/dataset/Scientific"
_DECOREC = f"{_RAW}/KIKIENAO/decorec/3d93ec5/dataset/downstream/Scientific"
_COLLISION = f"{_RAW}/Nishikata97/CollisionGenRec/505d5be3166f7c38ae67957daf8a3b7ec7092577"


def _recbole_files(base: str, hashes: dict[str, tuple[str, int]]) -> tuple[RemoteFile, ...]:
    """RemoteFiles for a RecBole folder whose local names equal the upstream names under ``base``."""
    return tuple(RemoteFile(name, f"{base}/{name}", sha, size) for name, (sha, size) in hashes.items())


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            name="amazon-beauty-2014",
            description="Amazon 2014 Beauty 5-core, S3-Rec/P5/TIGER leave-one-out split: 22,363 users, "
            "12,101 items, 198,502 interactions; titles, categories + brand, LETTER semantic IDs",
            source="s3rec",
            files=(
                RemoteFile(
                    "S3Rec_Beauty.txt",
                    f"{_S3REC}/data/Beauty.txt",
                    "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8",
                    1090094,
                ),
                RemoteFile(
                    "Beauty_item2attributes.json",
                    f"{_S3REC}/data/Beauty_item2attributes.json",
                    "129e40f67486f6877eff0f5318cfa8530ee8ac23d8b0d1de04e1bb7a2ba0b2d4",
                    305674,
                ),
                RemoteFile(
                    "datamaps.json",
                    f"{_P5ID}/data/beauty/datamaps.json",
                    "715ab04838ff1ba21238475ed453a89e8c30aa6214b904d27a79e4168fc7b612",
                    1835529,
                ),
                RemoteFile(
                    "LICENSE.LLM-RecSys-ID.txt",
                    f"{_P5ID}/LICENSE",
                    "252ab1f8d2c5bf2554e95248e371c962842f09ab8f38588f54e6ddce1b71a904",
                    1064,
                ),
                RemoteFile(
                    "products_lookup.csv",
                    f"{_LLMSEQ}/beauty/products_lookup.csv",
                    "65133eca0615999df67fc5b26a93a7da762e53e613a083fd6b9e37174896d128",
                    961053,
                ),
                RemoteFile(
                    "item_id_to_int.json",
                    f"{_LLMSEQ}/beauty/item_id_to_int.json",
                    "3d1a1d362c7daeddf616057fae8fa24af9d70902fdaf4631852231a9953afa50",
                    243011,
                ),
                RemoteFile(
                    "LICENSE.LLM-Sequential-Recommendation.txt",
                    f"{_LLMSEQ}/LICENSE",
                    "c0aaf63a6db6ba5e827a2976bcfcf670691729f53431d2dcd5d5381049d65919",
                    1529,
                ),
                RemoteFile(
                    "LETTER_Beauty.index.json",
                    f"{_LETTER}/data/Beauty/Beauty.index.json",
                    "be3fb890e59b5443824cdebc560ef349191b97f20d3aecad4727de2d6b212c82",
                    634238,
                ),
            ),
            license_note="Amazon review data (McAuley et al.): research use, no explicit licence from the "
            "data owners. S3-Rec and LETTER repositories: no LICENSE file. LLM-RecSys-ID: MIT. "
            "LLM-Sequential-Recommendation: BSD-3-Clause.",
        ),
        Benchmark(
            name="amazon-scientific-2018",
            description="Amazon 2018 Industrial_and_Scientific as preprocessed by UniSRec (RecBole atomic "
            "files, official train/valid/test): 8,442 users, 4,385 items, ~59.4k interactions; item text",
            source="recbole",
            files=_recbole_files(
                _COWPIREC,
                {
                    "Scientific.text": (
                        "95887e6bda76e54f59b71b566320520d5da74e21d3b6ff8f20bfb6e8e84aa831",
                        859222,
                    ),
                    "Scientific.item2index": (
                        "896ab1017508cf20834d3d0537da9f8f624324223a835af272a98ba16f8c087a",
                        69050,
                    ),
                    "Scientific.user2index": (
                        "f0162b1a3a0c6b7e816f86208e7b36f65d6787923126f9558fbc6d368e4c4974",
                        165602,
                    ),
                    "Scientific.train.inter": (
                        "7284f6489d956fa20c9b64ffc84569264320edba5c3bc2fcb22db2ea083a1163",
                        929295,
                    ),
                    "Scientific.valid.inter": (
                        "5f37c84d3b54617cdc46638c89dfe8741c7efc4987acd5eb64de2cbd4311f46c",
                        271473,
                    ),
                    "Scientific.test.inter": (
                        "546da7e5f44002b4518d7fd58066684bc09613f76c240914e16976d57cfe7083",
                        309842,
                    ),
                },
            ),
            license_note="Amazon review data 2018 (Ni et al.): research use, no explicit licence from the "
            "data owners. CoWPiRec repository (UniSRec preprocessing): no LICENSE file.",
        ),
        Benchmark(
            name="amazon-scientific-2018-mm",
            description="Multimodal subset of UniSRec Scientific: 2,928 users, 1,585 items, ~19.7k "
            "interactions; 512-d text (feat1CLS) and image (feat3CLS) features in one CLIP-style space",
            source="recbole-mm",
            files=_recbole_files(
                _DECOREC,
                {
                    "Scientific.text": (
                        "2989b83daab4624c7adc289d17baea0d09f85c20545e1635f7614926ae489167",
                        320975,
                    ),
                    "Scientific.item2index": (
                        "e689059637092e6dfaf6161ab71c5a3e54d96dc6a401a285c534cfc41516c022",
                        24250,
                    ),
                    "Scientific.user2index": (
                        "417271f5886f37761b9e7e0da8e80e189aac034922491ade408101bc31270642",
                        56749,
                    ),
                    "Scientific.train.inter": (
                        "ad7a8cc23499cdbc3a0ba3650a438f946da433131e786b4ce4dfeae1c5590c5f",
                        244167,
                    ),
                    "Scientific.valid.inter": (
                        "46b3f988b4f12ed05de4ba518e48744d7680eda42146138ffb416445d191cafb",
                        81808,
                    ),
                    "Scientific.test.inter": (
                        "46077666a7e26f6f3a0b8929c15b66af83b4a21859fb0a6c25692403fd703611",
                        93809,
                    ),
                    "Scientific.feat1CLS": (
                        "45fc2f23e1cd621f67ffc8584aa0cc30adae6eb5d7a354f79a2f93e6b94f8ae2",
                        3246080,
                    ),
                    "Scientific.feat3CLS": (
                        "20cb8a751cbc1a84c785bc4acdd13a3f1003d4be0c3c8d4034cd1de834b43389",
                        3246080,
                    ),
                },
            ),
            license_note="Amazon review data 2018 (Ni et al.): research use, no explicit licence from the "
            "data owners. DeCoRec repository (ACM MM'25): no LICENSE file.",
        ),
        Benchmark(
            name="amazon-scientific-2018-lcrec",
            description="Amazon 2018 Industrial_and_Scientific in LC-Rec JSON format: 8,317 users, 4,344 "
            "items, 58,492 interactions; title, description, brand, categories (no ASINs)",
            source="lcrec",
            files=(
                RemoteFile(
                    "Scientific.inter.json",
                    f"{_COLLISION}/data/Scientific/Scientific.inter.json",
                    "32c6c01876ebecebdfabd2dbd358594be36655e9e7b168772a7a3aa3624ee1b4",
                    408626,
                ),
                RemoteFile(
                    "Scientific.item.json",
                    f"{_COLLISION}/data/Scientific/Scientific.item.json",
                    "ad24200106868dac2b544d812305d61a11bf07fed78b2f7cdca41d66f3418e71",
                    3709486,
                ),
                RemoteFile(
                    "LICENSE.CollisionGenRec.txt",
                    f"{_COLLISION}/LICENSE",
                    "d4f61726a1d977edb08598c410393ba1f8995f134850d36ebc784a11fd3246b4",
                    1067,
                ),
            ),
            license_note="Amazon review data 2018 (Ni et al.): research use, no explicit licence from the "
            "data owners. CollisionGenRec repository: MIT.",
        ),
    )
}


# ----------------------------------------------------------------------------------------------
# Public API


def resolve_data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``explicit``, else ``SIDFORGE_DATA_DIR``, else the user cache.

    Nothing is created; callers that write (``pull``) create what they need.

    Args:
        explicit: the ``--data-dir`` value, if the user gave one.

    Returns:
        The directory, with ``~`` expanded (it may not exist).
    """
    if explicit:
        return Path(explicit).expanduser()
    from_env = os.environ.get(DATA_DIR_ENV)
    if from_env:
        return Path(from_env).expanduser()
    # XDG says a relative XDG_CACHE_HOME is invalid and must be ignored.
    xdg = os.environ.get("XDG_CACHE_HOME")
    cache = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return cache / "sidforge" / "data"


def get_benchmark(name: str) -> Benchmark:
    """Look a benchmark up in :data:`BENCHMARKS`.

    Args:
        name: registry key, e.g. ``amazon-beauty-2014``.

    Returns:
        The benchmark.

    Raises:
        UnknownBenchmark: ``name`` is not registered; the message lists the known names.
    """
    try:
        return BENCHMARKS[name]
    except KeyError:
        known = ", ".join(sorted(BENCHMARKS)) or "(none)"
        raise UnknownBenchmark(
            f"unknown benchmark {name!r}; known benchmarks: {known}. "
            "Use one of these names, or data.source='table' for your own data."
        ) from None


def pull(
    name: str,
    data_dir: str | os.PathLike[str],
    *,
    mirror: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Download a benchmark into ``data_dir/name`` and verify every file's size and sha256.

    Files already present with the pinned hash are skipped (unless ``force``). Each download goes to
    a temporary file in the same folder and is renamed only after its hash matches, so a failed
    download leaves nothing behind. A ``PROVENANCE.md`` listing the source URLs is written unless
    the folder already has one of its own.

    Args:
        name: registry key, e.g. ``amazon-beauty-2014``.
        data_dir: the data directory (see :func:`resolve_data_dir`); created if missing.
        mirror: base URL that replaces the pinned URLs with ``{mirror}/{name}/{path}``;
            defaults to ``SIDFORGE_DATA_MIRROR``.
        force: download even the files that are already present and correct.
        progress: show a progress bar per file (only when stderr is a terminal).

    Returns:
        The benchmark folder.

    Raises:
        UnknownBenchmark: ``name`` is not registered.
        DownloadError: a file could not be fetched or its bytes do not match the registry.
    """
    bench = get_benchmark(name)
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    folder = Path(data_dir).expanduser() / bench.name
    folder.mkdir(parents=True, exist_ok=True)
    show = progress and sys.stderr is not None and sys.stderr.isatty()
    fetched = 0
    for remote in bench.files:
        dest = folder / remote.path
        if not force and _is_intact(dest, remote):
            log.debug("%s/%s already present and verified; skipped", bench.name, remote.path)
            continue
        url = _source_url(bench, remote, mirror)
        log.info("downloading %s/%s from %s", bench.name, remote.path, url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        _download(url, dest, remote, progress=show)
        fetched += 1
    _write_provenance(folder, bench, mirror)
    skipped = len(bench.files) - fetched
    log.info("%s: %d file(s) downloaded, %d already present, in %s", bench.name, fetched, skipped, folder)
    return folder


def list_benchmarks(data_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every registered benchmark and its local state (a size check only, no hashing).

    Args:
        data_dir: the data directory.

    Returns:
        One dict per benchmark with ``name``, ``description``, ``source``, ``path`` (the local
        folder), ``present`` (at least one of its files exists), ``complete`` (every file exists
        with the right size), ``missing`` (files absent or of the wrong size) and ``size_bytes``
        (total size when complete).
    """
    root = Path(data_dir).expanduser()
    rows: list[dict[str, Any]] = []
    for bench in BENCHMARKS.values():
        folder = root / bench.name
        missing = [f.path for f in bench.files if _size_of(folder / f.path) != f.size]
        present = any((folder / f.path).is_file() for f in bench.files)
        rows.append(
            {
                "name": bench.name,
                "description": bench.description,
                "source": bench.source,
                "path": str(folder),
                "present": present,
                "complete": not missing,
                "missing": missing,
                "size_bytes": sum(f.size for f in bench.files),
            }
        )
    return rows


def verify(name: str, data_dir: str | os.PathLike[str]) -> list[str]:
    """Check every file of a local benchmark against the registry's size and sha256.

    Args:
        name: registry key.
        data_dir: the data directory.

    Returns:
        One line per problem (missing file, wrong size, wrong hash); empty when all is well.

    Raises:
        UnknownBenchmark: ``name`` is not registered.
    """
    bench = get_benchmark(name)
    folder = Path(data_dir).expanduser() / bench.name
    problems: list[str] = []
    for remote in bench.files:
        path = folder / remote.path
        size = _size_of(path)
        if size is None:
            problems.append(f"{remote.path}: missing (run `sidforge data pull {bench.name}`)")
        elif size != remote.size:
            problems.append(f"{remote.path}: size {size} bytes, expected {remote.size}")
        else:
            actual = _sha256_file(path)
            if actual != remote.sha256:
                problems.append(f"{remote.path}: sha256 {actual}, expected {remote.sha256}")
    return problems


# ----------------------------------------------------------------------------------------------
# Helpers


def _size_of(path: Path) -> int | None:
    """Size of a regular file, or ``None`` when it does not exist (or is not a file)."""
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _is_intact(path: Path, remote: RemoteFile) -> bool:
    return _size_of(path) == remote.size and _sha256_file(path) == remote.sha256


def _source_url(bench: Benchmark, remote: RemoteFile, mirror: str | None) -> str:
    if not mirror:
        return remote.url
    return f"{mirror.rstrip('/')}/{urllib.parse.quote(bench.name)}/{urllib.parse.quote(remote.path)}"


def _download(url: str, dest: Path, remote: RemoteFile, *, progress: bool) -> None:
    """Stream ``url`` into a temporary file next to ``dest``; rename it only if size and hash match."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        received = 0
        request = urllib.request.Request(url, headers={"User-Agent": "sidforge"})
        with os.fdopen(fd, "wb") as out:
            try:
                bar = tqdm(
                    total=remote.size, unit="B", unit_scale=True, desc=remote.path, disable=not progress, leave=False
                )
                with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response, bar:
                    # Stop one chunk past the expected size: a wrong file must not fill the disk.
                    while received <= remote.size and (chunk := response.read(_CHUNK_BYTES)):
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                raise DownloadError(remote.path, url, remote.sha256, None, str(exc)) from exc
        actual = digest.hexdigest()
        if received != remote.size:
            size_note = f"more than {remote.size}" if received > remote.size else str(received)
            reason = f"received {size_note} bytes, expected {remote.size}"
            raise DownloadError(remote.path, url, remote.sha256, actual, reason)
        if actual != remote.sha256:
            raise DownloadError(remote.path, url, remote.sha256, actual, "sha256 mismatch")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_provenance(folder: Path, bench: Benchmark, mirror: str | None) -> None:
    """Write ``PROVENANCE.md`` (source URLs, hashes, licences) unless the folder has its own."""
    path = folder / PROVENANCE_FILE
    if path.exists():
        try:
            existing = path.read_text(encoding="utf-8")
        except OSError:
            return
        if not existing.startswith(_PROVENANCE_MARKER):
            return  # the folder's own provenance (e.g. a hand-curated copy) is richer than ours
    else:
        existing = None
    lines = [
        _PROVENANCE_MARKER,
        f"# {bench.name}",
        "",
        bench.description + ".",
        "",
        f"Adapter: `{bench.source}`. Licences: {bench.license_note}",
        "",
        "| file | source URL | sha256 | bytes |",
        "|---|---|---|---|",
        *(f"| {f.path} | {f.url} | {f.sha256} | {f.size} |" for f in bench.files),
        "",
    ]
    if mirror:
        note = f"Downloaded through the mirror {mirror} (`{{mirror}}/{bench.name}/<file>`); every file was "
        lines += [note + "checked against the sha256 above.", ""]
    text = "\n".join(lines)
    if text == existing:
        return
    tmp = path.with_name(f".{PROVENANCE_FILE}.part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
