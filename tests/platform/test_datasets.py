"""Data directory resolution and benchmark download, against a local HTTP server (no internet)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidforge.platform import datasets
from sidforge.platform.datasets import (
    BENCHMARKS,
    Benchmark,
    DownloadError,
    RemoteFile,
    UnknownBenchmark,
    list_benchmarks,
    pull,
    resolve_data_dir,
    verify,
)

FAKE = "fake-bench"
FAKE_FILES = {"a.txt": b"1 2 3\n2 3 4\n", "sub/b.bin": bytes(range(256)) * 8}


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and records every requested path on the server."""

    def do_GET(self) -> None:
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


@dataclass
class Site:
    """A local HTTP server that mirrors the fake benchmark as ``{url}/{FAKE}/{path}``."""

    root: Path
    url: str
    requests: list[str]

    def write(self, path: str, data: bytes) -> None:
        target = self.root / FAKE / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _remote(path: str, data: bytes, base: str) -> RemoteFile:
    return RemoteFile(path, f"{base}/{FAKE}/{path}", hashlib.sha256(data).hexdigest(), len(data))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(datasets.MIRROR_ENV, raising=False)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    root = tmp_path / "site"
    root.mkdir()
    handler = functools.partial(_CountingHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests = []  # type: ignore[attr-defined]
    # A short poll interval keeps shutdown() (and so each test) fast.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    s = Site(root, f"http://127.0.0.1:{server.server_address[1]}", server.requests)  # type: ignore[attr-defined]
    for path, data in FAKE_FILES.items():
        s.write(path, data)
    try:
        yield s
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _fake_benchmark(base: str) -> Benchmark:
    files = tuple(_remote(p, d, base) for p, d in FAKE_FILES.items())
    return Benchmark(FAKE, "a tiny fake benchmark", "recbole", files, "test data")


@pytest.fixture
def fake_registry(site: Site, monkeypatch: pytest.MonkeyPatch) -> Benchmark:
    bench = _fake_benchmark(site.url)
    monkeypatch.setattr(datasets, "BENCHMARKS", {FAKE: bench})
    return bench


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.part"))


# ----------------------------------------------------------------------------------------------
# pull


def test_pull_downloads_verifies_and_writes_provenance(site: Site, fake_registry: Benchmark, tmp_path: Path):
    folder = pull(FAKE, tmp_path / "data", progress=False)

    assert folder == tmp_path / "data" / FAKE
    for path, data in FAKE_FILES.items():
        assert (folder / path).read_bytes() == data
    assert verify(FAKE, tmp_path / "data") == []
    assert _leftovers(folder) == []
    provenance = (folder / datasets.PROVENANCE_FILE).read_text()
    assert all(f.url in provenance and f.sha256 in provenance for f in fake_registry.files)


def test_second_pull_makes_no_request_and_force_refetches(site: Site, fake_registry: Benchmark, tmp_path: Path):
    pull(FAKE, tmp_path, progress=False)
    assert len(site.requests) == len(FAKE_FILES)

    pull(FAKE, tmp_path, progress=False)
    assert len(site.requests) == len(FAKE_FILES)

    pull(FAKE, tmp_path, progress=False, force=True)
    assert len(site.requests) == 2 * len(FAKE_FILES)


def test_corrupted_server_file_raises_and_leaves_no_file(site: Site, fake_registry: Benchmark, tmp_path: Path):
    good = FAKE_FILES["sub/b.bin"]
    bad = bytes(reversed(good))  # same size, different bytes
    site.write("sub/b.bin", bad)

    with pytest.raises(DownloadError) as info:
        pull(FAKE, tmp_path, progress=False)

    err = info.value
    expected = hashlib.sha256(good).hexdigest()
    actual = hashlib.sha256(bad).hexdigest()
    assert (err.path, err.expected_sha256, err.actual_sha256) == ("sub/b.bin", expected, actual)
    assert "sub/b.bin" in str(err) and err.url in str(err) and expected in str(err) and actual in str(err)
    folder = tmp_path / FAKE
    assert not (folder / "sub" / "b.bin").exists()
    assert _leftovers(folder) == []


def test_failed_forced_pull_keeps_the_good_local_file(site: Site, fake_registry: Benchmark, tmp_path: Path):
    pull(FAKE, tmp_path, progress=False)
    site.write("a.txt", b"X" * len(FAKE_FILES["a.txt"]))

    with pytest.raises(DownloadError):
        pull(FAKE, tmp_path, progress=False, force=True)

    assert (tmp_path / FAKE / "a.txt").read_bytes() == FAKE_FILES["a.txt"]
    assert _leftovers(tmp_path / FAKE) == []


def test_oversized_server_file_raises(site: Site, fake_registry: Benchmark, tmp_path: Path):
    site.write("a.txt", FAKE_FILES["a.txt"] * 1000)

    with pytest.raises(DownloadError, match="bytes, expected"):
        pull(FAKE, tmp_path, progress=False)
    assert not (tmp_path / FAKE / "a.txt").exists()
    assert _leftovers(tmp_path / FAKE) == []


def test_missing_server_file_raises_with_404(site: Site, fake_registry: Benchmark, tmp_path: Path):
    (site.root / FAKE / "a.txt").unlink()

    with pytest.raises(DownloadError, match="404") as info:
        pull(FAKE, tmp_path, progress=False)
    assert info.value.actual_sha256 is None
    assert "a.txt" in str(info.value) and info.value.expected_sha256 in str(info.value)
    assert not (tmp_path / FAKE / "a.txt").exists()
    assert _leftovers(tmp_path / FAKE) == []


def test_mirror_argument_and_env_replace_the_pinned_urls(
    site: Site, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    # Pinned URLs that would fail if contacted: the mirror must be used instead.
    monkeypatch.setattr(datasets, "BENCHMARKS", {FAKE: _fake_benchmark("http://127.0.0.1:9/nowhere")})

    pull(FAKE, tmp_path / "arg", mirror=site.url + "/", progress=False)
    assert sorted(site.requests) == sorted(f"/{FAKE}/{p}" for p in FAKE_FILES)

    monkeypatch.setenv(datasets.MIRROR_ENV, site.url)
    pull(FAKE, tmp_path / "env", progress=False)
    assert verify(FAKE, tmp_path / "env") == []

    # A plain folder works too (air-gapped sites): file:// URLs.
    pull(FAKE, tmp_path / "file", mirror=site.root.as_uri(), progress=False)
    assert verify(FAKE, tmp_path / "file") == []
    assert "mirror" in (tmp_path / "file" / FAKE / datasets.PROVENANCE_FILE).read_text()


def test_pull_keeps_a_foreign_provenance_file(site: Site, fake_registry: Benchmark, tmp_path: Path):
    folder = tmp_path / FAKE
    folder.mkdir()
    (folder / datasets.PROVENANCE_FILE).write_text("hand-curated\n")

    pull(FAKE, tmp_path, progress=False)
    assert (folder / datasets.PROVENANCE_FILE).read_text() == "hand-curated\n"


def test_unknown_benchmark_lists_the_known_names(fake_registry: Benchmark, tmp_path: Path):
    for call in (lambda: pull("nope", tmp_path), lambda: verify("nope", tmp_path)):
        with pytest.raises(UnknownBenchmark, match=FAKE) as info:
            call()
        assert isinstance(info.value, ValueError) and "nope" in str(info.value)
    assert not (tmp_path / "nope").exists()


# ----------------------------------------------------------------------------------------------
# data directory, listing, verification


def test_resolve_data_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv(datasets.DATA_DIR_ENV, raising=False)
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "sidforge" / "data"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir() == tmp_path / "xdg" / "sidforge" / "data"

    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(None) == tmp_path / "env"

    assert resolve_data_dir(str(tmp_path / "cli")) == tmp_path / "cli"
    assert resolve_data_dir("~/d") == tmp_path / "home" / "d"
    assert not any(p.exists() for p in (tmp_path / "home", tmp_path / "xdg", tmp_path / "env"))


def test_list_benchmarks_present_and_complete_flags(site: Site, fake_registry: Benchmark, tmp_path: Path):
    (row,) = list_benchmarks(tmp_path)
    assert (row["name"], row["source"], row["path"]) == (FAKE, "recbole", str(tmp_path / FAKE))
    assert (row["present"], row["complete"]) == (False, False)

    pull(FAKE, tmp_path, progress=False)
    (row,) = list_benchmarks(tmp_path)
    assert (row["present"], row["complete"], row["missing"]) == (True, True, [])

    (tmp_path / FAKE / "a.txt").write_bytes(b"short")
    (row,) = list_benchmarks(tmp_path)
    assert (row["present"], row["complete"], row["missing"]) == (True, False, ["a.txt"])


def test_verify_reports_each_problem(site: Site, fake_registry: Benchmark, tmp_path: Path):
    assert verify(FAKE, tmp_path) == [
        "a.txt: missing (run `sidforge data pull fake-bench`)",
        "sub/b.bin: missing (run `sidforge data pull fake-bench`)",
    ]
    pull(FAKE, tmp_path, progress=False)
    (tmp_path / FAKE / "a.txt").write_bytes(b"short")
    data = bytearray(FAKE_FILES["sub/b.bin"])
    data[0] ^= 1
    (tmp_path / FAKE / "sub" / "b.bin").write_bytes(bytes(data))

    problems = verify(FAKE, tmp_path)
    assert len(problems) == 2
    assert problems[0].startswith("a.txt: size 5 bytes")
    assert problems[1].startswith("sub/b.bin: sha256 ")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"path": "../x", "sha256": "0" * 64, "size": 1},
        {"path": "/abs", "sha256": "0" * 64, "size": 1},
        {"path": "x", "sha256": "ABC", "size": 1},
        {"path": "x", "sha256": "0" * 64, "size": -1},
    ],
)
def test_remote_file_rejects_bad_fields(kwargs: dict):
    with pytest.raises(ValueError):
        RemoteFile(url="https://example.org/x", **kwargs)


# ----------------------------------------------------------------------------------------------
# the real registry


def test_real_registry_is_pinned_to_github_commits():
    assert set(BENCHMARKS) == {
        "amazon-beauty-2014",
        "amazon-scientific-2018",
        "amazon-scientific-2018-mm",
        "amazon-scientific-2018-lcrec",
    }
    for name, bench in BENCHMARKS.items():
        assert bench.name == name
        for f in bench.files:
            owner, repo, commit, *upstream = f.url.removeprefix("https://raw.githubusercontent.com/").split("/")
            assert f.url.startswith("https://raw.githubusercontent.com/") and upstream, f.url
            assert len(commit) >= 7 and all(c in "0123456789abcdef" for c in commit), f.url


@pytest.mark.data
def test_real_registry_matches_the_data_dir():
    """The sha256/size literals match the shared copies (set SIDFORGE_DATA_DIR to check)."""
    root = os.environ.get(datasets.DATA_DIR_ENV)
    if not root or not Path(root).is_dir():
        pytest.skip(f"{datasets.DATA_DIR_ENV} is not set to an existing folder")
    found = [b for b in BENCHMARKS.values() if (Path(root) / b.name).is_dir()]
    if not found:
        pytest.skip(f"no registered benchmark folder under {root}")
    for bench in found:
        folder = Path(root) / bench.name
        assert verify(bench.name, root) == [], bench.name
        local = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert local - {datasets.PROVENANCE_FILE} == {f.path for f in bench.files}, bench.name
    rows = {r["name"]: r for r in list_benchmarks(root)}
    assert all(rows[b.name]["complete"] for b in found)
