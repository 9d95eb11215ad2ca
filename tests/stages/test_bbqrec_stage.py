"""BBQRec through the stages on configs/tiny.yaml: the BBQ tokenizer (unique IDs, quality report, assignment of
new items from content alone, behavior binding, errors) and SASRec reweighted by those IDs writing
RUN/sasrec-<name>; one slow 2-worker BBQ run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tiny_run import write_prepare_and_embed

from sidforge import cli
from sidforge.models.sasrec import SASRec, SASRecConfig
from sidforge.platform.artifacts import RunDir
from sidforge.platform.config import Config, ConfigError, load_config
from sidforge.platform.schemas import DataError
from sidforge.stages import sasrec, tokenize
from sidforge.stages.embed import ItemEmbeddings

REPO = Path(__file__).resolve().parents[2]
BBQ = ["tokenize.method=bbq"]
SASREC = ["sasrec.epochs=4"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_prepare_and_embed(cfg: Config) -> RunDir:
    return write_prepare_and_embed(cfg)


def _config(run_dir: Path, *overrides: str) -> Config:
    return load_config(REPO / "configs" / "tiny.yaml", [f"run_dir={run_dir}", *SASREC, *overrides])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """prepare + embed, the plain SASRec (RUN/sasrec = e_b), BBQ IDs and BBQ IDs without the contrastive loss."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny-bbqrec") / "run"
    run = _write_prepare_and_embed(_config(root))
    sasrec.run(_config(root), run)
    tokenize.run(_config(root, *BBQ), run)
    tokenize.run(_config(root, *BBQ, "tokenize.bbq.contrastive_weight=0", "tokenize.name=bbq-nocl"), run)
    return root


def _copy(built: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(built, dst)
    return dst


def _embeddings(run: Path) -> tuple[np.ndarray, np.ndarray]:
    content = ItemEmbeddings.from_table(pq.read_table(run / "embed" / "item_embeddings.parquet")).vectors["content"]
    behavior = np.asarray(pq.read_table(run / "sasrec" / "item_embeddings.parquet").column("embedding").to_pylist())
    return content, behavior


# ----------------------------------------------------------------------------------------------
# the BBQ tokenizer


def test_bbq_writes_unique_ids_a_quality_report_and_assigns_new_items_from_content(built):
    out = built / "tokenize-bbq"
    cfg = _config(built, *BBQ)
    sids = pq.read_table(out / "sids.parquet")
    n = cfg.synthetic.num_items
    assert sids.schema == tokenize.SIDS and sids.column("item_id").to_pylist() == list(range(n))
    ids = np.array(sids.column("sid").to_pylist())
    assert len(np.unique(ids, axis=0)) == n  # codes + digit: unique
    report = json.loads((out / "quality.json").read_text())
    assert report["method"] == "bbq" and report["unique_after"] == 1.0 and report["epochs"] == cfg.tokenize.bbq.epochs
    assert len(report["utilization"]) == cfg.tokenize.levels and min(report["utilization"]) > 0.5
    # codes alone (specific parts at their mean) explain less than codes + each item's specific parts
    assert 0 < report["recon_rel_full"] < report["recon_rel"] < 1.5
    assert len(report["behavior_coherence"]) == cfg.tokenize.levels
    assert report["contrastive_last"] < report["contrastive_first"] - 0.5  # the codebook learned behavior

    tok = tokenize.load_tokenizer(out)
    content, _ = _embeddings(built)
    codes = np.array(sids.column("codes").to_pylist())
    assert tok.method == "bbq" and np.array_equal(tok.assign(content), codes)  # digit mode keeps the codes
    rng = np.random.default_rng(1)
    new = content[:10] + 0.05 * rng.normal(size=(10, content.shape[1])).astype(np.float32)  # unseen items
    assigned = tok.assign(new)
    assert assigned.shape == (10, cfg.tokenize.levels) and ((assigned >= 0) & (assigned < 16)).all()
    assert (assigned[:, 0] == codes[:10, 0]).mean() >= 0.8  # a small perturbation mostly keeps the first code
    assert tok.reconstruct(assigned).shape == new.shape
    with pytest.raises(ValueError, match="shape"):
        tok.assign(content[:, :3])

    run = RunDir(built)
    assert tokenize.run(cfg, run).skipped
    assert tokenize.stage_config_hash(_config(built, *BBQ, "tokenize.rqvae.epochs=3")) == \
        tokenize.stage_config_hash(cfg)  # the RQ-VAE settings do not concern a BBQ tokenizer
    assert tokenize.stage_config_hash(_config(built, *BBQ, "tokenize.bbq.num_workers=2")) == \
        tokenize.stage_config_hash(cfg)
    assert tokenize.stage_config_hash(_config(built, *BBQ, "tokenize.bbq.mi_weight=0")) != \
        tokenize.stage_config_hash(cfg)


def test_the_contrastive_codebook_loss_binds_the_ids_to_behavior(built):
    _, behavior = _embeddings(built)
    full = json.loads((built / "tokenize-bbq" / "quality.json").read_text())
    ablated = json.loads((built / "tokenize-bbq-nocl" / "quality.json").read_text())
    # items sharing a first-level BBQ code are more alike in behavior than with the loss switched off
    assert full["behavior_coherence"][0] > ablated["behavior_coherence"][0] + 0.02, (full, ablated)
    assert full["contrastive_last"] < ablated["contrastive_last"] - 1.0


def test_bbq_names_its_missing_inputs_and_bad_settings(built, tmp_path):
    run_dir = _copy(built, tmp_path)
    shutil.rmtree(run_dir / "sasrec")
    with pytest.raises(DataError, match="run `sidforge train sasrec` first"):
        tokenize.run(_config(run_dir, *BBQ, "tokenize.name=again"), RunDir(run_dir))
    with pytest.raises(ConfigError, match="tokenize.source=embed"):
        _config(run_dir, *BBQ, "tokenize.source=sasrec")
    with pytest.raises(ConfigError, match="tokenize.bbq.mi_weight"):
        _config(run_dir, *BBQ, "tokenize.bbq.mi_weight=-1")
    assert not (run_dir / "tokenize-again").exists()


# ----------------------------------------------------------------------------------------------
# SASRec reweighted by the IDs


def test_sasrec_reweighted_by_bbq_ids_writes_its_own_folder_and_leaves_the_behavior_model_alone(built, tmp_path):
    run_dir = _copy(built, tmp_path)
    run = RunDir(run_dir)
    plain_entry = run.read_manifest().stages["sasrec"]
    reweighted = ("sasrec.reweight=sid", "sasrec.name=bbq", "sasrec.reweight_init=0.5", "sasrec.contrastive_weight=0.1")
    cfg = _config(run_dir, *reweighted)
    with pytest.raises(DataError, match="--sids"):
        sasrec.run(cfg, run)
    res = sasrec.run(cfg, run, run_dir / "tokenize-bbq")
    assert res.out_dir == run_dir / "sasrec-bbq" and not res.skipped
    assert res.metrics["test"]["recall@10"] > 5 * 10 / res.rows["items"]  # trained, far above random
    w = np.array(res.metrics["reweight_weights"])
    assert w.shape == (1, cfg.tokenize.levels) and not np.allclose(w, 0.5)  # learned from 0.5
    history = json.loads((res.out_dir / "metrics.json").read_text())["history"]
    assert len(history) == 4
    saved = torch.load(res.out_dir / "model.pt", weights_only=False)
    model = SASRec(SASRecConfig(**saved["config"]))
    model.load_state_dict(saved["state_dict"])  # the codes travel with the model
    codes = np.array(pq.read_table(run_dir / "tokenize-bbq" / "sids.parquet").column("codes").to_pylist())
    assert np.array_equal(model.sid_codes[:-1].numpy(), codes) and saved["config"]["contrastive_weight"] == 0.1
    assert run.read_manifest().stages["sasrec"] == plain_entry  # RUN/sasrec (e_b) untouched
    assert sasrec.run(cfg, run, run_dir / "tokenize-bbq").skipped
    # other IDs are another input: the variant trains again
    assert not run.is_current("sasrec-bbq", sasrec.stage_config_hash(cfg),
                              sasrec._input_fingerprints(run, run_dir / "tokenize-bbq-nocl"))
    # the plain model's hash ignores the (unused) reweighting settings and the output name
    plain = _config(run_dir)
    assert sasrec.stage_config_hash(plain) == sasrec.stage_config_hash(
        _config(run_dir, "sasrec.reweight_init=3", "sasrec.contrastive_temperature=0.5", "sasrec.name=x"))
    assert _config(run_dir, "sasrec.reweight=sid").sasrec.output_name == "sasrec-sid"
    # excluding the self-match counts only where it is switched on: recorded reweighted runs keep their hash
    assert sasrec.stage_config_hash(cfg) == sasrec.stage_config_hash(
        _config(run_dir, *reweighted, "sasrec.reweight_self=true"))
    assert sasrec.stage_config_hash(cfg) != sasrec.stage_config_hash(
        _config(run_dir, *reweighted, "sasrec.reweight_self=false"))
    assert sasrec.stage_config_hash(plain) == sasrec.stage_config_hash(_config(run_dir, "sasrec.reweight_self=false"))


def test_the_sequence_loss_can_target_the_semantic_ids_and_counts_in_the_hash_only_then(built, tmp_path):
    run_dir = _copy(built, tmp_path)
    reweighted = ("sasrec.reweight=sid", "sasrec.name=sidcl", "sasrec.contrastive_weight=0.1")
    cfg = _config(run_dir, *reweighted, "sasrec.contrastive_target=sid", "sasrec.epochs=2")
    res = sasrec.run(cfg, RunDir(run_dir), run_dir / "tokenize-bbq")
    saved = torch.load(res.out_dir / "model.pt", weights_only=False)
    codes = np.array(pq.read_table(run_dir / "tokenize-bbq" / "sids.parquet").column("codes").to_pylist())
    assert saved["config"]["contrastive_target"] == "sid"
    assert saved["config"]["sid_codebook_size"] == codes.max() + 1
    model = SASRec(SASRecConfig(**saved["config"]))
    model.load_state_dict(saved["state_dict"])  # the code embeddings travel with the model
    assert model.sid_code_emb.weight.shape == (codes.shape[1] * (codes.max() + 1) + 1, cfg.sasrec.hidden)
    # recorded runs (target item, or no sequence loss) keep their hashes
    item = _config(run_dir, *reweighted, "sasrec.epochs=2")
    assert sasrec.stage_config_hash(item) == sasrec.stage_config_hash(
        _config(run_dir, *reweighted, "sasrec.epochs=2", "sasrec.contrastive_target=item"))
    assert sasrec.stage_config_hash(item) != sasrec.stage_config_hash(cfg)
    off = ("sasrec.reweight=sid", "sasrec.contrastive_weight=0")
    assert sasrec.stage_config_hash(_config(run_dir, *off)) == sasrec.stage_config_hash(
        _config(run_dir, *off, "sasrec.contrastive_target=sid"))
    with pytest.raises(ConfigError, match="contrastive_target=sid"):
        _config(run_dir, "sasrec.contrastive_target=sid")  # no IDs without reweight=sid


def test_items_can_be_id_plus_sid_embeddings_which_the_outputs_hold_and_the_hash_counts_only_then(built, tmp_path):
    run_dir = _copy(built, tmp_path)
    reweighted = ("sasrec.reweight=sid", "sasrec.name=sidemb", "sasrec.epochs=2")
    cfg = _config(run_dir, *reweighted, "sasrec.item_repr=id+sid")
    res = sasrec.run(cfg, RunDir(run_dir), run_dir / "tokenize-bbq")
    saved = torch.load(res.out_dir / "model.pt", weights_only=False)
    codes = np.array(pq.read_table(run_dir / "tokenize-bbq" / "sids.parquet").column("codes").to_pylist())
    assert saved["config"]["item_repr"] == "id+sid" and saved["config"]["sid_codebook_size"] == codes.max() + 1
    model = SASRec(SASRecConfig(**saved["config"]))
    model.load_state_dict(saved["state_dict"])
    # the written item embeddings are what the model scores with: ID rows plus semantic-ID rows
    written = np.asarray(pq.read_table(res.out_dir / "item_embeddings.parquet").column("embedding").to_pylist())
    with torch.no_grad():
        composite = model.item_embeddings().numpy()
        id_rows = model.item_emb.weight[: len(codes)].numpy()
    assert np.allclose(written, composite, atol=1e-6) and not np.allclose(written, id_rows, atol=1e-3)
    # recorded runs (items as IDs) keep their hashes; a plain SASRec cannot read codes it does not load
    plain = _config(run_dir, *reweighted)
    assert sasrec.stage_config_hash(plain) == sasrec.stage_config_hash(
        _config(run_dir, *reweighted, "sasrec.item_repr=id"))
    assert sasrec.stage_config_hash(plain) != sasrec.stage_config_hash(cfg)
    with pytest.raises(ConfigError, match="item_repr=id\\+sid"):
        _config(run_dir, "sasrec.item_repr=id+sid")
    with pytest.raises(ConfigError, match="item_repr"):
        _config(run_dir, *reweighted, "sasrec.item_repr=sid")


def test_items_can_carry_their_content_features_which_travel_with_the_model_and_count_as_an_input(built, tmp_path):
    run_dir = _copy(built, tmp_path)
    run = RunDir(run_dir)
    reweighted = ("sasrec.reweight=sid", "sasrec.name=mm", "sasrec.epochs=2", "sasrec.contrastive_weight=0.1")
    cfg = _config(run_dir, *reweighted, "sasrec.item_features=[content]")
    res = sasrec.run(cfg, run, run_dir / "tokenize-bbq")
    content, _ = _embeddings(run_dir)
    saved = torch.load(res.out_dir / "model.pt", weights_only=False)
    assert saved["config"]["feature_dim"] == content.shape[1]
    model = SASRec(SASRecConfig(**saved["config"]))
    model.load_state_dict(saved["state_dict"])  # the features travel with the model, the pad row zero
    assert np.array_equal(model.item_features[:-1].numpy(), content) and not model.item_features[-1].any()
    written = np.asarray(pq.read_table(res.out_dir / "item_embeddings.parquet").column("embedding").to_pylist())
    with torch.no_grad():
        assert np.allclose(written, model.item_embeddings().numpy(), atol=1e-6)
        assert not np.allclose(written, model.item_emb.weight[: len(content)].numpy(), atol=1e-3)
    # the embeddings are an input: recorded, and another embed trains the variant again
    assert "embed/item_embeddings.parquet" in run.read_manifest().stages["sasrec-mm"].inputs
    assert sasrec.run(cfg, run, run_dir / "tokenize-bbq").skipped
    table = pq.read_table(run_dir / "embed" / "item_embeddings.parquet")
    shifted = ItemEmbeddings(np.arange(len(content)), {"content": content + 1.0}).to_table()
    pq.write_table(shifted, run_dir / "embed" / "item_embeddings.parquet")
    assert not run.is_current("sasrec-mm", sasrec.stage_config_hash(cfg),
                              sasrec._input_fingerprints(run, run_dir / "tokenize-bbq", True))
    pq.write_table(table, run_dir / "embed" / "item_embeddings.parquet")
    # counted in the hash only when named: recorded runs keep theirs
    plain = _config(run_dir, *reweighted)
    assert sasrec.stage_config_hash(plain) == sasrec.stage_config_hash(_config(run_dir, *reweighted, "sasrec.item_features=[]"))
    assert sasrec.stage_config_hash(plain) != sasrec.stage_config_hash(cfg)
    # a plain SASRec can carry them too (the reweighting's ablation on the same items)
    assert sasrec.loop_config(_config(run_dir, "sasrec.item_features=[content]"), sasrec.load_sequences(
        run_dir / "prepare", 8), features=content)["model"]["feature_dim"] == content.shape[1]


def test_content_features_name_what_is_missing(built, tmp_path):
    run_dir = _copy(built, tmp_path)
    with pytest.raises(DataError, match=r"\['image'\] not in .* \['content'\]"):
        sasrec.run(_config(run_dir, "sasrec.item_features=[image]", "sasrec.name=img"), RunDir(run_dir))
    with pytest.raises(ConfigError, match="each embed modality once"):
        _config(run_dir, "sasrec.item_features=[content, content]")
    shutil.rmtree(run_dir / "embed")
    with pytest.raises(DataError, match="run `sidforge embed` first"):
        sasrec.run(_config(run_dir, "sasrec.item_features=[content]", "sasrec.name=mm"), RunDir(run_dir))
    assert not (run_dir / "sasrec-img").exists() and not (run_dir / "sasrec-mm").exists()


def test_the_code_table_can_have_its_own_weight_decay_which_touches_nothing_else(built, tmp_path):
    run_dir = _copy(built, tmp_path)
    reweighted = ("sasrec.reweight=sid", "sasrec.item_repr=id+sid", "sasrec.lr=0.01")
    cfg = _config(run_dir, *reweighted, "sasrec.sid_weight_decay=5")
    codes = np.array(pq.read_table(run_dir / "tokenize-bbq" / "sids.parquet").column("codes").to_pylist())
    data = sasrec.load_sequences(run_dir / "prepare", cfg.sasrec.max_len)
    config = sasrec.loop_config(cfg, data, codes)
    model = SASRec(SASRecConfig(**config["model"]), torch.from_numpy(codes))
    opt = torch.optim.AdamW(sasrec._param_groups(model, config), lr=cfg.sasrec.lr, weight_decay=0.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: a step only applies the decoupled decay
    opt.step()
    for name, p in model.named_parameters():
        factor = 1 - 0.01 * 5 if name == "sid_code_emb.weight" else 1.0
        assert torch.allclose(p.detach(), before[name] * factor), name
    # unset, the table shares weight_decay (one group) and the hash of every recorded run stays
    plain = _config(run_dir, *reweighted)
    assert len(list(sasrec._param_groups(model, sasrec.loop_config(plain, data, codes)))) == len(before)
    assert sasrec.stage_config_hash(plain) != sasrec.stage_config_hash(cfg)
    assert sasrec.stage_config_hash(plain) == sasrec.stage_config_hash(
        _config(run_dir, "sasrec.reweight=sid", "sasrec.item_repr=id+sid", "sasrec.lr=0.01"))
    # a model without the code table ignores it, so one --set can reach every stage of a run
    no_table = ("sasrec.reweight=sid", "sasrec.contrastive_weight=0", "sasrec.contrastive_target=sid")
    assert sasrec.stage_config_hash(_config(run_dir)) == sasrec.stage_config_hash(
        _config(run_dir, "sasrec.sid_weight_decay=1"))
    assert sasrec.stage_config_hash(_config(run_dir, *no_table)) == sasrec.stage_config_hash(
        _config(run_dir, *no_table, "sasrec.sid_weight_decay=1"))
    with pytest.raises(ConfigError, match="sid_weight_decay must be >= 0"):
        _config(run_dir, *reweighted, "sasrec.sid_weight_decay=-1")


def test_cli_trains_a_reweighted_sasrec(built, tmp_path, capsys):
    run_dir = _copy(built, tmp_path)
    config = REPO / "configs" / "tiny.yaml"
    assert cli.main(["train", "sasrec", "-c", str(config), "--run-dir", str(run_dir), "--reweight", "sid",
                     "--sids", str(run_dir / "tokenize-bbq"), "--set", "sasrec.epochs=2", "--refit"]) == 0
    out = capsys.readouterr().out
    assert "train sasrec: trained in" in out and "sasrec-sid\n" in out and "recall@10" in out
    selected = json.loads((run_dir / "sasrec-sid" / "metrics.json").read_text())
    # --refit: the same reweighted model on train + valid for the epochs chosen on valid, test only
    refit = json.loads((run_dir / "sasrec-sid-refit" / "metrics.json").read_text())
    assert len(refit["history"]) == selected["best_epoch"] + 1 and "valid" not in refit
    assert "sasrec-sid-refit" in out and out.count("\nvalid ") == 1  # the selection run's table alone has valid
    assert cli.main(["train", "ranker", "-c", str(config), "--run-dir", str(run_dir), "--refit"]) == 2
    assert "--refit belongs to `train sasrec`" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_bbq_on_two_workers_learns_and_keeps_the_replicas_in_sync(ray_cluster, built, tmp_path):
    """Real Ray Train workers (DDP over gloo): every BBQ parameter takes part in every step."""
    run_dir = _copy(built, tmp_path)
    res = tokenize.run(_config(run_dir, *BBQ, "tokenize.name=two", "tokenize.bbq.num_workers=2"), RunDir(run_dir))
    assert res.metrics["workers"] == 2 and res.metrics["unique_after"] == 1.0  # the stage checked the replicas
    assert res.metrics["contrastive_last"] < res.metrics["contrastive_first"]
    content, _ = _embeddings(run_dir)
    codes = np.array(pq.read_table(res.out_dir / "sids.parquet").column("codes").to_pylist())
    assert np.array_equal(tokenize.load_tokenizer(res.out_dir).assign(content), codes)
