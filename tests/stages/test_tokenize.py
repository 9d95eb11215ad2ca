"""The tokenize stage on planted-cluster embeddings: outputs, quality report, assignment of new items,
LETTER-style imports, bad input, and one 2-worker RQ-VAE run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sidforge.platform.artifacts import RunDir
from sidforge.platform.config import ConfigError
from sidforge.platform.schemas import DataError
from sidforge.stages import tokenize
from sidforge.stages.embed import ItemEmbeddings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, CLUSTERS, DIM = 480, 6, 12
SMALL = ["tokenize.levels=2", "tokenize.codebook_size=12", "tokenize.rqvae.hidden=[32]",
         "tokenize.rqvae.latent_dim=8", "tokenize.rqvae.batch_size=96", "tokenize.rqvae.epochs=25"]


def _planted(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, CLUSTERS, N)
    centres = rng.normal(size=(CLUSTERS, DIM)) * 3.0
    return (centres[truth] + rng.normal(size=(N, DIM)) * 0.4).astype(np.float32), truth


@pytest.fixture
def run(tiny_config) -> tuple[RunDir, np.ndarray, np.ndarray]:
    """A run directory holding just what tokenize reads: prepare/items.parquet and embed/ outputs."""
    cfg = tiny_config()
    run = RunDir(cfg.run_dir)
    x, truth = _planted()
    for stage in ("prepare", "embed"):
        run.stage_dir(stage).mkdir(parents=True)
    pq.write_table(pa.table({"item_id": np.arange(N, dtype=np.int64), "source_id": [f"P{i:04d}" for i in range(N)]}),
                   run.stage_dir("prepare") / "items.parquet")
    pq.write_table(ItemEmbeddings(np.arange(N), {"content": x}).to_table(),
                   run.stage_dir("embed") / "item_embeddings.parquet")
    return run, x, truth


def _first_level_purity(sids: pa.Table, truth: np.ndarray) -> float:
    first = np.array([c[0] for c in sids.column("codes").to_pylist()])
    return sum(np.bincount(truth[first == c]).max() for c in np.unique(first)) / len(first)


def test_rqkmeans_writes_unique_ids_a_quality_report_and_a_reusable_tokenizer(run, tiny_config):
    run_dir, x, truth = run
    cfg = tiny_config("tokenize.method=rqkmeans", *SMALL)
    res = tokenize.run(cfg, run_dir)

    assert res.out_dir == run_dir.stage_dir("tokenize-rqkmeans")
    sids = pq.read_table(res.out_dir / "sids.parquet")
    assert sids.schema == tokenize.SIDS and sids.column("item_id").to_pylist() == list(range(N))
    ids = np.array(sids.column("sid").to_pylist())
    assert ids.shape == (N, 3) and len(np.unique(ids, axis=0)) == N  # codes + digit, all unique
    assert _first_level_purity(sids, truth) > 0.95

    report = json.loads((res.out_dir / "quality.json").read_text())
    for key in ("utilization", "entropy", "collision_rate", "unique_prefix", "recon_rel"):
        assert key in report
    assert len(report["utilization"]) == 2 and 0 < report["recon_rel"] < 0.2
    assert report["unique_after"] == 1.0
    assert (res.out_dir / "code_usage.png").stat().st_size > 1000
    assert run_dir.read_manifest().stages["tokenize-rqkmeans"].metrics["collision_rate"] == report["collision_rate"]

    tok = tokenize.load_tokenizer(res.out_dir)
    codes = np.array(sids.column("codes").to_pylist())
    assert np.array_equal(tok.assign(x), codes)  # digit mode leaves the codes as assigned
    assert np.array_equal(tok.assign(x[:7]), tok.assign(x[:7]))
    with pytest.raises(ValueError, match=r"shape \(N, 12\)"):
        tok.assign(x[:, :5])
    bad = x[:3].copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"rows \[1\] contain NaN"):
        tok.assign(bad)

    assert tokenize.run(cfg, run_dir).skipped
    assert not tokenize.run(tiny_config("tokenize.method=rqkmeans", *SMALL, "tokenize.balanced=true"),
                            run_dir).skipped


def test_rqkmeans_on_a_pca_projection_saves_the_projection_and_assigns_and_decodes_through_it(run, tiny_config):
    run_dir, x, truth = run
    cfg = tiny_config("tokenize.method=rqkmeans", *SMALL, "tokenize.name=pca",
                      "tokenize.rqkmeans.pca_dim=4", "tokenize.rqkmeans.whiten=true")
    res = tokenize.run(cfg, run_dir)
    sids = pq.read_table(res.out_dir / "sids.parquet")
    assert _first_level_purity(sids, truth) > 0.95  # the planted clusters live in the top components
    meta = json.loads((res.out_dir / "tokenizer.json").read_text())
    assert meta["pca_dim"] == 4 and meta["input_dim"] == DIM

    tok = tokenize.load_tokenizer(res.out_dir)
    assert tok.codebooks.shape == (2, 12, 4) and tok.projection[1].shape == (DIM, 4)
    codes = np.array(sids.column("codes").to_pylist())
    assert np.array_equal(tok.assign(x), codes)  # raw embeddings in, projected inside
    back = tok.reconstruct(codes)
    assert back.shape == (N, DIM)
    recon = ((x - back) ** 2).sum() / (x**2).sum()
    report = json.loads((res.out_dir / "quality.json").read_text())
    assert recon == pytest.approx(report["recon_rel"], rel=1e-4) and recon < 0.2  # decoded in the input space
    with pytest.raises(ValueError, match=r"shape \(N, 12\)"):
        tok.assign(x[:, :4])

    plain = tokenize.run(tiny_config("tokenize.method=rqkmeans", *SMALL), run_dir)
    manifest = run_dir.read_manifest().stages
    assert manifest["tokenize-rqkmeans"].config_hash != manifest["tokenize-pca"].config_hash
    assert "pca_dim" not in json.loads((plain.out_dir / "tokenizer.json").read_text())
    with pytest.raises(DataError, match="pca_dim=13 exceeds the embedding width 12"):
        tokenize.run(tiny_config("tokenize.method=rqkmeans", *SMALL, "tokenize.rqkmeans.pca_dim=13"), run_dir)
    with pytest.raises(ConfigError, match="pca_dim=-1 must be >= 0"):
        tiny_config("tokenize.rqkmeans.pca_dim=-1")
    # whiten without a projection changes nothing, so it does not change the stage's hash either
    assert tokenize.run(tiny_config("tokenize.method=rqkmeans", *SMALL, "tokenize.rqkmeans.whiten=true"),
                        run_dir).skipped


def test_rqvae_trains_in_process_and_its_ids_follow_the_planted_clusters(run, tiny_config):
    run_dir, x, truth = run
    cfg = tiny_config("tokenize.method=rqvae", "tokenize.collision=reassign", *SMALL)
    res = tokenize.run(cfg, run_dir)

    sids = pq.read_table(res.out_dir / "sids.parquet")
    ids = np.array(sids.column("sid").to_pylist())
    assert len(np.unique(ids, axis=0)) == N
    assert _first_level_purity(sids, truth) > 0.9
    report = res.metrics
    assert report["epochs"] == 25 and min(report["utilization"]) > 0.9  # dead codes were re-used
    assert report["reassigned"] > 0 or report["collision_rate"] == 0
    assert not (run_dir.path / "_train").exists() or not any((run_dir.path / "_train").iterdir())

    tok = tokenize.load_tokenizer(res.out_dir)
    assert tok.method == "rqvae"
    stored = np.array(sids.column("codes").to_pylist())
    assigned = tok.assign(x)
    moved = (assigned != stored).any(axis=1)
    assert moved.sum() == report["reassigned"]  # only re-assigned items differ from a fresh assignment
    assert tok.reconstruct(assigned[:4]).shape == (4, DIM)


def test_precomputed_ids_import_tokens_by_our_id_or_the_source_id(run, tiny_config, tmp_path):
    run_dir, _, _ = run
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(N, 3))
    path = tmp_path / "letter.index.json"
    path.write_text(json.dumps({str(i): [f"<a_{a}>", f"<b_{b}>", f"<c_{c}>"] for i, (a, b, c) in enumerate(codes)}))
    res = tokenize.run(tiny_config("tokenize.method=precomputed", f"tokenize.path={path}",
                                   "tokenize.codebook_size=16"), run_dir)
    sids = pq.read_table(res.out_dir / "sids.parquet")
    assert np.array_equal(np.array(sids.column("codes").to_pylist()), codes)
    assert len(np.unique(np.array(sids.column("sid").to_pylist()), axis=0)) == N
    with pytest.raises(ValueError, match="cannot assign"):
        tokenize.load_tokenizer(res.out_dir).assign(np.zeros((1, DIM)))

    by_source = tmp_path / "codes.csv"
    by_source.write_text("key,codes\n" + "".join(f"P{i:04d},{a}|{b}\n" for i, (a, b, _) in enumerate(codes)))
    res = tokenize.run(tiny_config("tokenize.method=precomputed", f"tokenize.path={by_source}",
                                   "tokenize.key=source_id", "tokenize.name=by-source"), run_dir)
    assert res.out_dir.name == "tokenize-by-source" and res.rows["levels"] == 2

    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"0": [1, 2]}))
    with pytest.raises(DataError, match=f"{N - 1} of {N} catalogue items have no codes"):
        tokenize.run(tiny_config("tokenize.method=precomputed", f"tokenize.path={partial}"), run_dir)


def test_bad_configs_and_missing_inputs_are_named(run, tiny_config, tmp_path):
    run_dir, _, _ = run
    with pytest.raises(ConfigError, match="tokenize.path is required"):
        tiny_config("tokenize.method=precomputed")
    with pytest.raises(ConfigError, match="tokenize.rqvae.hidden"):
        tiny_config("tokenize.rqvae.hidden=[]")
    with pytest.raises(DataError, match=r"tokenize.modalities: \['image'\]"):
        tokenize.run(tiny_config("tokenize.method=rqkmeans", "tokenize.modalities=[image]", *SMALL), run_dir)
    with pytest.raises(DataError, match="run `sidforge train sasrec` first"):
        tokenize.run(tiny_config("tokenize.method=rqkmeans", "tokenize.source=sasrec", *SMALL), run_dir)
    with pytest.raises(DataError, match="cannot fill tokenize.codebook_size=1024"):
        tokenize.run(tiny_config("tokenize.method=rqkmeans", "tokenize.codebook_size=1024"), run_dir)
    assert not run_dir.stage_dir("tokenize-rqkmeans").exists()  # nothing half-written


@pytest.mark.ray
@pytest.mark.slow
def test_rqvae_on_two_workers_matches_the_in_process_quality(ray_cluster, run, tiny_config):
    run_dir, x, truth = run
    one = tokenize.run(tiny_config("tokenize.method=rqvae", *SMALL), run_dir)
    two = tokenize.run(tiny_config("tokenize.method=rqvae", "tokenize.name=two", "tokenize.rqvae.num_workers=2",
                                   *SMALL), run_dir)
    assert two.metrics["epochs"] == 25
    sids = pq.read_table(two.out_dir / "sids.parquet")
    assert _first_level_purity(sids, truth) > 0.9
    # 2 workers take half as many steps per epoch (batch size is per worker): compare with slack
    assert one.metrics["recon_rel"] < 0.5 and two.metrics["recon_rel"] < 0.5, (one.metrics, two.metrics)
    assert two.metrics["workers"] == 2 and two.metrics["dead_codes_reset"] > 0
    # the stage checks that the ranks' replicas (codebooks re-initialised on every rank) stayed identical,
    # and the saved model reproduces the stored IDs
    tok = tokenize.load_tokenizer(two.out_dir)
    assert np.array_equal(tok.assign(x), np.array(sids.column("codes").to_pylist()))


def test_cli_tokenize_prints_the_quality_table_and_names_missing_inputs(run, tiny_config, capsys, tmp_path):
    from sidforge import cli

    run_dir, _, _ = run
    config = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    small = [a for s in SMALL for a in ("--set", s)]
    assert cli.main(["tokenize", "-c", str(config), "--run-dir", str(run_dir.path), "--method", "rqkmeans",
                     *small]) == 0
    out = capsys.readouterr().out
    assert "tokenize rqkmeans: done" in out and "collision rate (before)" in out and "utilization per level" in out
    assert cli.main(["tokenize", "-c", str(config), "--run-dir", str(tmp_path / "empty"), "--method", "rqkmeans"]) == 2
    assert "run `sidforge embed` first" in capsys.readouterr().err
