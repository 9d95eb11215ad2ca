"""The serving catalogue and the models that follow it (no Ray): unique IDs for new items (digit and
reassign), the log that survives a restart, followers that catch up or start over on a new epoch, the
ranker's room for new items (``with_capacity`` / ``set_item_rows``), and the generative retriever's
trie growing with the catalogue."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from sidforge.models.ranker import RankerConfig, SaviorRanker, set_item_rows, with_capacity
from sidforge.platform.schemas import DataError
from sidforge.serving.catalogue import CatalogueState, Follower
from sidforge.serving.plan import resolve

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = np.array([[0, 0], [0, 1], [1, 0], [0, 0]])
DIGIT_SIDS = [[0, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]]


def _vec(n: int) -> list[dict[str, np.ndarray]]:
    return [{"z": np.full(2, float(i), dtype=np.float32)} for i in range(n)]


def test_digit_ids_count_the_items_sharing_the_codes():
    cat = CatalogueState(BASE, DIGIT_SIDS, "digit", {"z": 2}, "v1")
    added = cat.add(np.array([[0, 0], [1, 1], [1, 1]]), None, _vec(3))
    assert [a["item_id"] for a in added] == [4, 5, 6] and cat.size == 7
    assert [a["sid"] for a in added] == [[0, 0, 2], [1, 1, 0], [1, 1, 1]]


def test_reassign_moves_to_the_nearest_free_last_code_then_falls_back_to_a_digit():
    cat = CatalogueState(BASE[:3], [[0, 0], [0, 1], [1, 0]], "reassign", {"z": 2}, "v1")
    order = np.array([[0, 1, 2], [0, 1, 2], [1, 0, 2]])  # last-level codes, nearest first
    added = cat.add(np.array([[0, 0], [0, 0], [1, 1]]), order, _vec(3))
    assert [a["sid"] for a in added] == [[0, 2], [0, 0, 1], [1, 1]]  # prefix 0 is full after [0, 2]
    assert added[1]["codes"] == [0, 0]


def test_since_hands_out_deltas_and_everything_on_a_new_epoch():
    cat = CatalogueState(BASE, DIGIT_SIDS, "digit", {"z": 2}, "v1")
    cat.add(np.array([[1, 1], [1, 1]]), None, _vec(2))
    d = cat.since(5, cat.epoch)
    assert (d.start, d.end, d.sids) == (5, 6, [[1, 1, 1]]) and d.vectors["z"].tolist() == [[1.0, 1.0]]
    assert cat.since(6, cat.epoch).end == 6
    full = cat.since(6, "another")
    assert (full.start, full.end) == (4, 6)


class _Copy:
    """A follower target recording what it was given."""

    def __init__(self) -> None:
        self.size, self.resets = 4, 0

    def reset(self) -> None:
        self.size, self.resets = 4, self.resets + 1

    def extend(self, delta) -> None:
        assert delta.start == self.size
        self.size = delta.end


def test_followers_catch_up_and_start_over_when_the_catalogue_restarts():
    cat = CatalogueState(BASE, DIGIT_SIDS, "digit", {"z": 2}, "v1")
    cat.add(np.array([[1, 1]] * 3), None, _vec(3))
    copy = _Copy()
    f = Follower(copy)
    f.apply(cat.since(copy.size, f.epoch))
    assert copy.size == 7 and copy.resets == 1
    f.apply(cat.since(5, cat.epoch))  # overlapping delta: only the new part is applied (none here)
    assert copy.size == 7
    restarted = CatalogueState(BASE, DIGIT_SIDS, "digit", {"z": 2}, "v1")  # no log: additions lost
    restarted.add(np.array([[1, 1]]), None, _vec(1))
    f.apply(restarted.since(copy.size, f.epoch))
    assert copy.size == 5 and copy.resets == 2


def test_the_log_replays_additions_and_keeps_the_epoch(tmp_path):
    path = tmp_path / "catalogue.jsonl"
    cat = CatalogueState(BASE, DIGIT_SIDS, "digit", {"z": 2}, "v1", path)
    cat.add(np.array([[0, 0], [1, 1]]), None, _vec(2))
    again = CatalogueState(BASE, DIGIT_SIDS, "digit", {"z": 2}, "v1", path)
    assert again.epoch == cat.epoch and again.size == 6 and again.sids == cat.sids
    assert np.array_equal(again.vectors["z"], cat.vectors["z"])
    assert again.add(np.array([[0, 0]]), None, _vec(1))[0]["sid"] == [0, 0, 3]  # digits continue
    with pytest.raises(DataError, match="move it away"):
        CatalogueState(BASE, DIGIT_SIDS, "digit", {"z": 2}, "v2", path)
    assert json.loads(path.read_text().splitlines()[0])["version"] == "v1"


# ----------------------------------------------------------------------------------------------
# the ranker: room for new items (sidforge.models.ranker.with_capacity / set_item_rows)


def _ranker() -> SaviorRanker:
    torch.manual_seed(0)
    c = RankerConfig(num_items=6, id_dim=8, content_dim=4, codebook_sizes=(3, 3), mba_dim=4, mba_hidden=8,
                     attn_hidden=8, mlp=(16,))
    model = SaviorRanker(c)
    model.set_item_tables(torch.rand(6, 1), torch.randn(6, 4), torch.randint(0, 3, (6, 2)))
    for book in model.mba.codebooks:  # trained codebooks are not zero
        torch.nn.init.normal_(book.weight)
    return model.eval()


def test_with_capacity_keeps_old_items_and_adds_untrained_rows():
    model = _ranker()
    grown = with_capacity(model, 10).eval()
    assert grown.config == dataclasses.replace(model.config, num_items=10) and grown.config.pad_id == 10
    hist, target = torch.tensor([[6, 0, 1], [2, 3, 4]]), torch.tensor([5, 1])
    with torch.no_grad():
        before = model(hist, target).logits
        after = grown(torch.where(hist == 6, 10, hist), target).logits  # the padding id moved
    torch.testing.assert_close(before, after)
    assert grown.item_emb.weight[6:].abs().sum() == 0 and grown.stats[6:].abs().sum() == 0
    set_item_rows(grown, torch.tensor([6, 7]), torch.zeros(2, 1), torch.randn(2, 4), torch.tensor([[1, 2], [0, 0]]))
    assert grown.codes[6].tolist() == [1, 2] and grown.item_emb.weight[6].abs().sum() == 0
    with torch.no_grad():
        logits = grown(torch.tensor([[0, 6], [1, 7]]), torch.tensor([7, 6])).logits
    assert torch.isfinite(logits).all() and logits[0] != logits[1]
    with pytest.raises(ValueError, match="codes must lie"):
        set_item_rows(grown, torch.tensor([8]), torch.zeros(1, 1), torch.randn(1, 4), torch.tensor([[3, 0]]))
    with pytest.raises(ValueError, match="ids in"):
        set_item_rows(grown, torch.tensor([10]), torch.zeros(1, 1), torch.randn(1, 4), torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="below"):
        with_capacity(model, 5)


# ----------------------------------------------------------------------------------------------
# the generative retriever over a (random, untrained) TIGER saved in the stage's format


def test_generative_retriever_adds_new_ids_to_its_trie(tiny_run, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from sidforge.models.generative import TIGER, TIGERConfig
    from sidforge.serving.models import GenerativeRetriever
    from sidforge.serving.plan import load_codes
    from sidforge.stages.generative import MODEL_FORMAT

    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run)
    cfg = dataclasses.replace(tiny_run, run_dir=str(run), serve=dataclasses.replace(tiny_run.serve, retriever="generative"))
    sids_dir = run / "tokenize-rqkmeans"
    _, sids = load_codes(resolve(dataclasses.replace(cfg, serve=tiny_run.serve)))
    sizes = [16, 16, max(s[-1] for s in sids) + 2]  # room for one more collision digit
    config = TIGERConfig(level_sizes=tuple(sizes), max_history=5, d_model=16, num_layers=1, num_heads=2, head_dim=8,
                         ffn_hidden=16, dropout=0.0)
    torch.manual_seed(0)
    out = run / "generative-rqkmeans"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in TIGER(config).state_dict().items()}, str(out / "model.safetensors"))
    (out / "model.json").write_text(json.dumps({"format": MODEL_FORMAT, "config": dataclasses.asdict(config),
                                                "sids": str(sids_dir), "beam_size": 400, "top_k": 10}))
    plan = resolve(cfg)
    r = GenerativeRetriever(plan)
    ids, scores = r.retrieve([1, 2, 3], 10)
    assert len(ids) == 10 and not {1, 2, 3} & set(ids) and scores == sorted(scores, reverse=True)
    cat = CatalogueState(*load_codes(plan), plan.collision, {"aligned": 16}, plan.version)
    copy = sids[7][:2]
    cat.add(np.array([copy, copy[:1] + [15]]), None, [{"aligned": np.zeros(16, np.float32)}] * 2)
    r.extend(cat.since(300, cat.epoch))
    assert r.size == 302
    ids, scores = r.retrieve([1, 300], 302)  # beam >= catalogue: every fitting item comes back
    assert r.fits[300] and (301 in ids or not r.fits[301])
    assert 300 not in ids and len(ids) == int(r.fits.sum()) - 2
