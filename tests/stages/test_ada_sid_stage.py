"""ADA-SID through the stages on configs/tiny.yaml: the tokenizer (unique variable-length IDs with weights,
the quality report, assignment of new items, errors), the ranker's SID features from those weights, TIGER
over the variable-length IDs, and one slow 2-worker run."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_bbqrec_stage import _write_prepare_and_embed  # the synthetic prepare + embed writer (same folder)

from sidforge.models.semantic_ids import quality
from sidforge.platform.artifacts import RunDir
from sidforge.platform.config import Config, ConfigError, load_config
from sidforge.platform.schemas import DataError
from sidforge.stages import generative, ranker, sasrec, tokenize
from sidforge.stages.embed import ItemEmbeddings

REPO = Path(__file__).resolve().parents[2]
ADA = ["tokenize.method=ada-sid"]
RANKER = ["ranker.content=none", "ranker.mba=false", "ranker.attention=one_way", "ranker.epochs=2",
          "ranker.id_dim=16", "ranker.sid_dim=8", "ranker.attn_hidden=16", "ranker.mlp=[32]", "ranker.batch_size=256"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(run_dir: Path, *overrides: str) -> Config:
    return load_config(REPO / "configs" / "tiny.yaml", [f"run_dir={run_dir}", "sasrec.epochs=4", *overrides])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """prepare + embed, SASRec (e_b), ADA-SID IDs and the no-router ablation's IDs."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny-ada-sid") / "run"
    run = _write_prepare_and_embed(_config(root))
    sasrec.run(_config(root), run)
    tokenize.run(_config(root, *ADA), run)
    tokenize.run(_config(root, *ADA, "tokenize.ada_sid.router=false", "tokenize.name=norouter"), run)
    return root


def _inputs(run: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    content = ItemEmbeddings.from_table(pq.read_table(run / "embed" / "item_embeddings.parquet")).vectors["content"]
    behavior = np.asarray(pq.read_table(run / "sasrec" / "item_embeddings.parquet").column("embedding").to_pylist(),
                          dtype=np.float32)
    counts = pq.read_table(run / "prepare" / "item_stats.parquet").column("train_count").to_numpy()
    return content, behavior, counts


def test_ada_sid_writes_unique_variable_length_ids_with_weights_and_a_quality_report(built):
    out = built / "tokenize-ada-sid"
    cfg = _config(built, *ADA)
    a = cfg.tokenize.ada_sid
    K, E = a.codebook_size, 1 + 1 + a.behavior_experts
    sids = pq.read_table(out / "sids.parquet")
    n = cfg.synthetic.num_items
    assert sids.schema == tokenize.SIDS and sids.column("item_id").to_pylist() == list(range(n))
    codes, weights = sids.column("codes").to_pylist(), sids.column("weights").to_pylist()
    ids = sids.column("sid").to_pylist()
    assert len({tuple(s) for s in ids}) == n  # unique
    lengths = np.array([len(c) for c in codes])
    assert lengths.min() >= 2 and lengths.max() <= E and len(set(lengths)) > 1  # variable length
    assert all(len(c) == len(w) and min(w) > 0 for c, w in zip(codes, weights))  # dropped codes are gone
    assert all(s[:-1] == c for s, c in zip(ids, codes))  # sid = codes + the collision digit
    for c in codes:  # token = expert * K + code: shared, then text, then behavioral experts in order
        experts = [t // K for t in c]
        assert experts[:2] == [0, 1] and experts == sorted(set(experts)) and max(experts) < E
    counts = _inputs(built)[2]
    assert (lengths[counts == 0] == 2).all()  # never trained on: no behavior, no behavioral codes

    report = json.loads((out / "quality.json").read_text())
    assert report["method"] == "ada-sid" and report["unique_after"] == 1.0 and report["sid_length"] == E + 1
    assert len(report["utilization"]) == E and len(report["entropy"]) == E and len(report["presence"]) == E
    assert report["presence"][:2] == [1.0, 1.0] and max(report["presence"][2:]) < 1.0
    assert report["avg_code_length"] == pytest.approx(lengths.mean())
    assert report["avg_sid_length"] == pytest.approx(lengths.mean() + 1)
    assert 0 < report["recon_rel"] < 1 and 0 < report["valid"]["recon_rel"] < 1.5
    assert 0 < report["dropped_share"] < 1 and len(report["expert_load"]) == a.behavior_experts
    assert report["by_bucket"]["cold"]["dropped_share"] == 1.0 and report["by_bucket"]["cold"]["alignment_w"] == 0
    assert report["experts"] == ["shared0", "content0", *(f"behavior{j}" for j in range(5))]
    meta = json.loads((out / "tokenizer.json").read_text())
    assert meta["code_offsets"] == [K * e for e in range(E)] and meta["levels"] == E


def test_assign_reproduces_the_ids_and_gives_new_items_content_codes(built):
    out = built / "tokenize-ada-sid"
    tok = tokenize.load_tokenizer(out)
    content, behavior, counts = _inputs(built)
    seen = counts > 0
    richness, _, _ = tokenize.ada_sid_richness("norm", behavior, counts)
    table = pq.read_table(out / "sids.parquet")
    K = tok.codebook_size
    # every trained item again, with its e_b and N_norm (items never trained on: content only)
    got, w = tok.assign_weighted(content[seen], behavior[seen], richness[seen])
    expect = [c for c, s in zip(table.column("codes").to_pylist(), seen) if s]
    assert [[e * K + c for e, c in enumerate(row) if c >= 0] for row in got.tolist()] == expect
    assert np.allclose([x for row, ws in zip(got, w) for x, c in zip(ws, row) if c >= 0],
                       [x for ws, s in zip(table.column("weights").to_pylist(), seen) if s for x in ws], atol=1e-6)
    # a richness=norm tokenizer derives N_norm from the e_b norm itself
    assert np.array_equal(tok.assign(content[seen], behavior[seen]), got)
    # new items without behavior: shared + text codes from content, behavioral codes dropped
    new = tok.assign(content[:10] + 0.01)
    assert new.shape == (10, 7) and (new[:, 2:] == -1).all() and ((new[:, :2] >= 0) & (new[:, :2] < K)).all()
    text = np.array([c[1] - K for c in table.column("codes").to_pylist()[:10]])
    assert (new[:, 1] == text).mean() >= 0.8  # the text-specific code depends on content only: barely moves
    assert tok.reconstruct(new).shape == content[:10].shape
    with pytest.raises(ValueError, match="shape"):
        tok.assign(content[:, :3])
    with pytest.raises(ValueError, match="behavior"):
        tok.assign(content[:3], behavior[:3, :4])
    with pytest.raises(ValueError, match="no common last level"):
        tok.last_distances(content, got)


def test_quality_and_collisions_handle_dropped_codes():
    codes = np.array([[1, 2, -1], [1, 2, 3], [1, 2, -1], [0, 2, 3]])
    q = quality(codes, 4)
    assert q["collision_rate"] == 0.5 and q["presence"] == [1.0, 1.0, 0.5] and q["avg_codes"] == 2.5
    assert q["utilization"][2] == 0.25 and q["entropy"][2] == 0.0  # only the two present codes count
    assert "presence" not in quality(codes[[1, 3]], 4)  # fixed-length reports are unchanged


def test_the_no_router_ablation_keeps_every_behavioral_id_at_weight_one(built):
    table = pq.read_table(built / "tokenize-norouter" / "sids.parquet")
    counts = _inputs(built)[2]
    lengths = np.array([len(c) for c in table.column("codes").to_pylist()])
    assert (lengths[counts > 0] == 7).all() and (lengths[counts == 0] == 2).all()
    assert all(set(w) == {1.0} for w in table.column("weights").to_pylist())
    report = json.loads((built / "tokenize-norouter" / "quality.json").read_text())
    assert report["dropped_share"] == 0.0


def test_the_stage_skips_and_hashes_only_what_concerns_ada_sid(built, tmp_path):
    cfg = _config(built, *ADA)
    assert tokenize.run(cfg, RunDir(built)).skipped
    h = tokenize.stage_config_hash(cfg)
    assert tokenize.stage_config_hash(_config(built, *ADA, "tokenize.bbq.mi_weight=0")) == h
    assert tokenize.stage_config_hash(_config(built, *ADA, "tokenize.ada_sid.num_workers=2")) == h
    assert tokenize.stage_config_hash(_config(built, *ADA, "tokenize.ada_sid.align_beta=8")) != h
    # the other tokenizers keep their hashes whatever the ada_sid section says
    assert tokenize.stage_config_hash(_config(built, "tokenize.ada_sid.epochs=3")) == \
        tokenize.stage_config_hash(_config(built))
    with pytest.raises(ConfigError, match="tokenize.collision=digit"):
        _config(built, *ADA, "tokenize.collision=reassign")
    with pytest.raises(ConfigError, match="tokenize.source=embed"):
        _config(built, *ADA, "tokenize.source=sasrec")
    with pytest.raises(ConfigError, match="tokenize.ada_sid.sparsity_target"):
        _config(built, *ADA, "tokenize.ada_sid.sparsity_target=1.5")
    run_dir = tmp_path / "run"
    shutil.copytree(built, run_dir)
    shutil.rmtree(run_dir / "sasrec")
    with pytest.raises(DataError, match="sidforge train sasrec"):
        tokenize.run(_config(run_dir, *ADA, "tokenize.name=again"), RunDir(run_dir))


# ----------------------------------------------------------------------------------------------
# downstream on the same IDs


@pytest.mark.ray
def test_ranker_uses_the_sid_features_weighted_by_the_router(built, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(built, run_dir)
    run = RunDir(run_dir)
    sids = run_dir / "tokenize-ada-sid"
    cfg = _config(run_dir, *RANKER, "ranker.sid_features=true", "ranker.name=sid")
    with pytest.raises(DataError, match="ranker.sid_features needs semantic IDs"):
        ranker.run(cfg, run, None)
    res = ranker.run(cfg, run, sids)
    table = pq.read_table(sids / "sids.parquet")
    lengths = [len(c) for c in table.column("codes").to_pylist()]
    assert res.metrics["sid_avg_length"] == pytest.approx(np.mean(lengths))
    assert res.metrics["test"]["auc"] > 0.6, res.metrics["test"]
    saved = torch.load(res.out_dir / "model.pt", weights_only=True)
    state = saved["state_dict"]
    assert len(saved["config"]["sid_sizes"]) == max(lengths)
    for i in (0, 5, 17):  # the item's weights as written by the tokenizer, zero past its length
        w = table.column("weights")[i].as_py()
        assert np.allclose(state["sid_weights"][i, : len(w)].numpy(), w)
        assert (state["sid_weights"][i, len(w):] == 0).all()
    assert any(k.startswith("sid_tables.") for k in state)
    # the plain item-ID ranker's hash does not see the new (unused) settings
    plain = _config(run_dir, *RANKER)
    assert ranker.stage_config_hash(plain) == ranker.stage_config_hash(_config(run_dir, *RANKER, "ranker.sid_dim=4"))
    assert ranker.stage_config_hash(plain) != ranker.stage_config_hash(cfg)


@pytest.mark.ray
def test_generative_retrieval_trains_on_the_variable_length_ids(built, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(built, run_dir)
    cfg = _config(run_dir, "generative.epochs=1", "generative.eval_users=50", "generative.batch_size=64",
                  "generative.user_tokens=16")
    res = generative.run(cfg, RunDir(run_dir), run_dir / "tokenize-ada-sid")
    assert res.out_dir.name == "generative-ada-sid"
    codes, sizes, _ = generative.load_sid_codes(run_dir / "tokenize-ada-sid", cfg.synthetic.num_items)
    assert (codes == -1).any() and len(sizes) == 8  # -1-padded, up to 7 codes + the digit
    assert res.metrics["test"]["count"] > 0 and 0 <= res.metrics["test"]["recall@10"] <= 1


@pytest.mark.ray
@pytest.mark.slow
def test_ada_sid_on_two_workers_keeps_the_replicas_in_sync(ray_cluster, built, tmp_path):
    """Real Ray Train workers (DDP over gloo): every ADA-SID parameter takes part in every step."""
    run_dir = tmp_path / "run"
    shutil.copytree(built, run_dir)
    base = _config(run_dir, *ADA, "tokenize.name=two", "tokenize.ada_sid.epochs=6")
    cfg = dataclasses.replace(base, tokenize=dataclasses.replace(
        base.tokenize, ada_sid=dataclasses.replace(base.tokenize.ada_sid, num_workers=2)))
    res = tokenize.run(cfg, RunDir(run_dir))
    assert res.metrics["workers"] == 2 and res.metrics["unique_after"] == 1.0  # the stage checked the replicas
    content, behavior, counts = _inputs(run_dir)
    seen = counts > 0
    tok = tokenize.load_tokenizer(res.out_dir)
    got = tok.assign(content[seen], behavior[seen])
    codes = [c for c, s in zip(pq.read_table(res.out_dir / "sids.parquet").column("codes").to_pylist(), seen) if s]
    assert [[e * tok.codebook_size + c for e, c in enumerate(row) if c >= 0] for row in got.tolist()] == codes
