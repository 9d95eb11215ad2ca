"""BBQRec's additions to SASRec: the SID-similarity attention reweighting (a no-op at weight 0; otherwise it
moves attention only between items with matching codes, in the expected direction) and the
sequence-to-item contrastive loss (CPU, < 2 s)."""

from __future__ import annotations

import pytest
import torch

from sidforge.models.sasrec import SASRec, SASRecConfig, SIDSimilarityBias

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_ITEMS, L = 12, 3


def codes() -> torch.Tensor:
    """(N_ITEMS, L): items 0-3 share level 1 = 0, items 0-1 share all levels up to 2; item 11 lacks level 3."""
    c = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 2, 2], [1, 0, 0], [1, 1, 1], [2, 0, 0], [2, 1, 1],
                      [3, 0, 0], [3, 1, 2], [4, 0, 0], [4, 1, -1]])
    assert c.shape == (N_ITEMS, L)
    return c


def model(seed: int = 0, **overrides: object) -> SASRec:
    fields = dict(num_items=N_ITEMS, max_len=8, hidden=16, num_layers=2, num_heads=2, ffn_hidden=32, dropout=0.1)
    fields.update(overrides)
    config = SASRecConfig(**fields)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    return SASRec(config, codes() if config.sid_levels else None)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    P = N_ITEMS
    ids = torch.tensor([[P, P, 0, 1, 4, 2, 3, 0], [5, 6, 7, 8, 9, 10, 11, 1], [P, P, P, P, P, 2, 0, 1]])
    targets = torch.tensor([[P, P, 1, 4, 2, 3, 0, 6], [6, 7, 8, 9, 10, 11, 1, 2], [P, P, P, P, P, 0, 1, 3]])
    return ids, targets


@pytest.mark.parametrize("match", ["level", "prefix"])
@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_weight_zero_is_bit_identical_to_plain_sasrec(match: str, loss: str):
    plain = model(loss=loss)
    zero = model(loss=loss, sid_levels=L, reweight_init=0.0, reweight_match=match, reweight_per_head=True)
    # the reweighted model draws no extra random numbers: the same seed gives the same parameters
    for name, p in plain.state_dict().items():
        assert torch.equal(p, zero.state_dict()[name]), name
    ids, targets = batch()
    negatives = torch.randint(0, N_ITEMS, targets.shape, generator=torch.Generator().manual_seed(1))

    def both(fn_name: str, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for m in (plain, zero):
            torch.manual_seed(5)  # the same dropout draws
            r = getattr(m, fn_name)(*args)
            out.append(r.loss if fn_name == "loss" else r)
        return out[0], out[1]

    # training (dropout on) and inference (no_grad): bit-identical
    plain.train()
    zero.train()
    for name, args in (("loss", (ids, targets, negatives)), ("forward", (ids,))):
        a, b = both(name, *args)
        assert torch.equal(a, b), name
    plain.eval()
    zero.eval()
    with torch.no_grad():
        for name, args in (("loss", (ids, targets, negatives)), ("forward", (ids,)), ("score_all", (ids,))):
            a, b = both(name, *args)
            assert torch.equal(a, b), name
        # a fixed (not learned) zero weight too
        frozen = model(loss=loss, sid_levels=L, reweight_init=0.0, reweight_learned=False).eval()
        assert torch.equal(frozen(ids), plain(ids))
    # eval mode with autograd: a mask that needs a gradient sends SDPA to its math kernel instead of the
    # fused one, so the two agree to float rounding only
    a, b = both("forward", ids)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_bias_counts_per_level_or_prefix_matches_and_padding_matches_nothing():
    w = torch.tensor([[1.0, 10.0, 100.0]])
    pair = torch.tensor([[[0, 0, 0], [0, 2, 0], [-1, -1, -1]]])  # (1, T=3, L): level 1 and 3 match, level 2 not
    level = SIDSimilarityBias(L, match="level", learned=False)
    prefix = SIDSimilarityBias(L, match="prefix", learned=False)
    level.weight.copy_(w)
    prefix.weight.copy_(w)
    assert level(pair)[0, 0, 0, 1] == 101.0 and prefix(pair)[0, 0, 0, 1] == 1.0
    assert level(pair)[0, 0, 0, 0] == 111.0 == prefix(pair)[0, 0, 0, 0]  # an item matches itself fully
    assert not level(pair)[0, 0, 2].any() and not level(pair)[0, 0, :, 2].any()  # -1 matches nothing, not even -1
    assert isinstance(level.weight, torch.Tensor) and "weight" in dict(level.named_buffers())
    assert "weight" in dict(SIDSimilarityBias(L, heads=2).named_parameters())
    assert SIDSimilarityBias(L, heads=2)(pair).shape == (1, 2, 3, 3)


def test_without_the_self_match_the_diagonal_carries_no_bias_and_the_rest_is_unchanged():
    pair = torch.tensor([[[0, 0, 0], [0, 2, 0], [0, 0, 0], [-1, -1, -1]]])  # positions 0 and 2: the same codes
    with_self = SIDSimilarityBias(L, learned=False, init=1.0)
    no_self = SIDSimilarityBias(L, learned=False, init=1.0, self_match=False)
    a, b = with_self(pair)[0, 0], no_self(pair)[0, 0]
    assert torch.equal(torch.diagonal(a), torch.tensor([3.0, 3.0, 3.0, 0.0]))  # an item matches itself fully
    assert not torch.diagonal(b).any()
    off = ~torch.eye(4, dtype=torch.bool)
    assert torch.equal(a[off], b[off]) and b[0, 2] == 3.0 and b[0, 1] == 2.0  # other positions as before
    prefix = SIDSimilarityBias(L, match="prefix", learned=False, self_match=False)(pair)[0, 0]
    assert not torch.diagonal(prefix).any() and prefix[0, 1] == 1.0


def test_without_the_self_match_a_query_keeps_its_share_on_itself_relative_to_non_matching_keys():
    """Self excluded: the own position is weighted like a key with no matching code (factor 1 before
    renormalisation), where with it the own position always gets the largest factor."""
    plain = model().eval()
    ids, _ = batch()
    for self_match in (True, False):
        rw = model(sid_levels=L, reweight_init=0.7, reweight_self=self_match).eval()
        with torch.no_grad():
            ratio = _attention(rw, ids) / _attention(plain, ids)
        # row 1 (items 5 .. 11, 1): position 3 holds item 8 = [3, 0, 0]; keys 0-2 hold items 5, 6, 7
        # = [1, 1, 1], [2, 0, 0], [2, 1, 1]: item 6 matches item 8 at levels 2 and 3, items 5 and 7 nowhere
        r = ratio[1, 0, 3, :4]
        assert r[0] == pytest.approx(float(r[2]), rel=1e-4)  # two non-matching keys: the same factor
        assert float(r[1] / r[0]) == pytest.approx(torch.exp(torch.tensor(1.4)).item(), rel=1e-3)
        own = float(r[3] / r[0])
        expected = torch.exp(torch.tensor(2.1)).item() if self_match else 1.0
        assert own == pytest.approx(expected, rel=1e-3)


def _attention(m: SASRec, ids: torch.Tensor) -> torch.Tensor:
    """First layer's attention probabilities (B, nh, T, T), eval mode, with the model's own SID bias."""
    blk = m.blocks[0]
    B, T = ids.shape
    pos = torch.arange(m.config.max_len - T, m.config.max_len)
    x = blk.ln_1(m.item_emb(ids) + m.pos_emb(pos))
    q, k, _ = blk.attn.c_attn(x).split(m.config.hidden, dim=2)
    nh, hs = m.config.num_heads, m.config.hidden // m.config.num_heads
    q = q.view(B, T, nh, hs).transpose(1, 2)
    k = k.view(B, T, nh, hs).transpose(1, 2)
    bias = m.sid_bias(m.sid_codes[ids]) if m.sid_bias is not None else None
    mask = m._attn_mask(ids != m.config.pad_id, bias)
    return torch.softmax(q @ k.transpose(-1, -2) / hs**0.5 + mask, dim=-1)


def test_a_positive_weight_moves_attention_toward_keys_with_matching_codes_and_only_there():
    plain, rw = model().eval(), model(sid_levels=L, reweight_init=0.7).eval()
    ids, _ = batch()
    with torch.no_grad():
        ratio = _attention(rw, ids) / _attention(plain, ids)  # (B, nh, T, T); NaN where both are 0
        matches = (codes()[ids.clamp(max=N_ITEMS - 1)][:, :, None, :] == codes()[ids.clamp(max=N_ITEMS - 1)][:, None, :, :])
        n_match = (matches & (codes()[ids.clamp(max=N_ITEMS - 1)][:, :, None, :] >= 0)).sum(-1)  # (B, T, T)
    real = ids != N_ITEMS
    checked = 0
    for b in range(ids.shape[0]):
        for i in range(ids.shape[1]):
            if not real[b, i]:
                continue
            keys = [j for j in range(i + 1) if real[b, j]]
            if len({int(n_match[b, i, j]) for j in keys}) < 2:
                continue  # every key matches equally: renormalisation leaves the row unchanged
            for h in range(rw.config.num_heads):
                r = {j: float(ratio[b, h, i, j]) for j in keys}
                # attention is multiplied by exp(0.7 * matches) then renormalised: more matches, larger ratio
                by_matches: dict[int, set[float]] = {}
                for j in keys:
                    by_matches.setdefault(int(n_match[b, i, j]), set()).add(round(r[j], 4))
                levels = sorted(by_matches)
                assert all(len(v) == 1 for v in by_matches.values()), by_matches  # same matches, same factor
                factors = [by_matches[m].pop() for m in levels]
                assert factors == sorted(factors) and factors[-1] > 1.0 > factors[0], factors
                assert factors[-1] / factors[0] == pytest.approx(torch.exp(torch.tensor(0.7 * (levels[-1] - levels[0])))
                                                                 .item(), rel=1e-3)
                checked += 1
    assert checked > 10


def test_codes_are_a_buffer_saved_with_the_model_and_checked():
    m = model(sid_levels=L)
    state = m.state_dict()
    assert torch.equal(state["sid_codes"][:N_ITEMS], codes()) and (state["sid_codes"][N_ITEMS] == -1).all()
    again = SASRec(m.config)
    again.load_state_dict(state)
    assert torch.equal(again.sid_codes, m.sid_codes)
    with pytest.raises(ValueError, match="sid_codes must have shape"):
        m.set_sid_codes(codes()[:, :2])
    with pytest.raises(ValueError, match="sid_levels=0"):
        SASRec(SASRecConfig(num_items=N_ITEMS), codes())
    frozen = model(sid_levels=L, reweight_learned=False)
    assert "sid_bias.weight" not in dict(frozen.named_parameters())


def test_sequence_to_item_contrastive_loss_is_added_and_trains():
    ids, targets = batch()
    plain = model(dropout=0.0).eval()
    cl = model(dropout=0.0, contrastive_weight=0.5).eval()
    a, b = plain.loss(ids, targets), cl.loss(ids, targets)
    assert "contrastive" in b.metrics and "contrastive" not in a.metrics
    assert torch.allclose(b.loss, a.loss + 0.5 * b.metrics["contrastive"])
    # all three sequences end in different targets (6, 2, 3): positives among 3 candidates
    assert 0.0 < float(b.metrics["contrastive"]) < 2 * torch.log(torch.tensor(3.0))
    same = targets.clone()
    same[:, -1] = 4  # every sequence has the same target: no negatives left, and no NaN
    assert torch.isfinite(cl.loss(ids, same).loss)
    opt = torch.optim.Adam(cl.parameters(), lr=1e-2)
    first = float(cl.loss(ids, targets).metrics["contrastive"])
    cl.train()
    for _ in range(30):
        out = cl.loss(ids, targets)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    cl.eval()
    assert float(cl.loss(ids, targets).metrics["contrastive"]) < 0.5 * first


def _sid_model(**overrides: object) -> SASRec:
    fields: dict[str, object] = dict(dropout=0.0, sid_levels=L, contrastive_weight=1.0, contrastive_target="sid",
                                     sid_codebook_size=5)
    return model(**{**fields, **overrides})


def test_a_sid_embedding_is_the_sum_of_its_code_rows_and_a_missing_level_adds_nothing():
    m = _sid_model()
    rows = m.sid_code_emb.weight
    assert torch.allclose(m.sid_embeddings(torch.tensor([1]))[0], rows[0] + rows[5 + 0] + rows[10 + 1])
    assert torch.allclose(m.sid_embeddings(torch.tensor([11]))[0], rows[4] + rows[5 + 1])  # level 3 is -1
    assert m.sid_embeddings(torch.tensor([[0, 5], [6, 7]])).shape == (2, 2, 16)
    # the code table is drawn after every other weight: the rest starts as the plain reweighted model's
    plain = model(dropout=0.0, sid_levels=L).state_dict()
    assert all(torch.equal(v, plain[k]) for k, v in m.state_dict().items() if not k.startswith("sid_code_emb"))


def _info_nce(seq: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, t: float) -> torch.Tensor:
    logits = torch.nn.functional.normalize(seq, dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).T / t
    return torch.nn.functional.cross_entropy(logits.masked_fill(mask, float("-inf")), torch.arange(len(seq)))


def test_the_sid_target_contrasts_with_the_id_embedding_and_items_with_equal_ids_are_no_negatives():
    ids, targets = batch()  # last targets 6, 2, 3
    m = _sid_model().eval()
    last = m(ids)[:, -1]
    keys = m.sid_embeddings(targets[:, -1])
    none = torch.zeros(3, 3, dtype=torch.bool)
    got = m.loss(ids, targets).metrics["contrastive"]
    assert torch.allclose(got, _info_nce(last, keys, none, 0.1), atol=1e-6)
    twin = codes()
    twin[3] = twin[2]  # items 2 and 3 now carry one ID: neither is the other's negative
    m.set_sid_codes(twin)
    last, keys = m(ids)[:, -1], m.sid_embeddings(targets[:, -1])
    masked = none.clone()
    masked[1, 2] = masked[2, 1] = True
    got = m.loss(ids, targets).metrics["contrastive"]
    assert torch.allclose(got, _info_nce(last, keys, masked, 0.1), atol=1e-6)
    assert not torch.allclose(got, _info_nce(last, keys, none, 0.1), atol=1e-3)


def test_the_sid_target_trains_the_code_rows_of_the_targets_only_and_is_checked():
    ids, targets = batch()
    m = _sid_model(contrastive_weight=0.5)
    m.loss(ids, targets).loss.backward()
    grad = m.sid_code_emb.weight.grad.abs().sum(dim=-1)
    used = {lvl * 5 + int(c) for item in (6, 2, 3) for lvl, c in enumerate(codes()[item]) if c >= 0}
    assert all(grad[r] > 0 for r in used) and all(grad[r] == 0 for r in range(len(grad)) if r not in used)
    with pytest.raises(ValueError, match="sid_codebook_size"):
        SASRecConfig(num_items=N_ITEMS, contrastive_target="sid")
    with pytest.raises(ValueError, match="largest code"):
        _sid_model(sid_codebook_size=4)  # code 4 at level 1 does not fit
    with pytest.raises(ValueError, match="contrastive_target"):
        SASRecConfig(num_items=N_ITEMS, contrastive_target="content")  # type: ignore[arg-type]


def test_an_id_plus_sid_item_is_its_id_row_plus_its_code_rows_in_input_scores_and_targets():
    m = model(dropout=0.0, sid_levels=L, sid_codebook_size=5, item_repr="id+sid").eval()
    rows, ids_w = m.sid_code_emb.weight, m.item_emb.weight
    assert torch.allclose(m.embed_items(torch.tensor([1]))[0], ids_w[1] + rows[0] + rows[5 + 0] + rows[10 + 1])
    assert torch.equal(m.embed_items(torch.tensor([N_ITEMS]))[0], torch.zeros(16))  # padding stays zero
    table = m.item_embeddings()
    assert torch.allclose(table, ids_w[:N_ITEMS] + m.sid_embeddings(torch.arange(N_ITEMS)))
    ids, _ = batch()
    assert torch.allclose(m.score_all(ids), m(ids)[:, -1] @ table.T)
    # the code rows are part of every item that carries them: moving the row of level-1 code 0 (items 0-3)
    # shifts the scores of exactly those items, and leaves a sequence that holds none of them unchanged
    with torch.no_grad():
        before = m.score_all(ids[:, -1:] * 0 + 5)  # sequence [5]: no code 0 at level 1 in its input
        h = m(ids[:, -1:] * 0 + 5)[:, -1]
        m.sid_code_emb.weight[0] += torch.linspace(-1.0, 1.0, 16)  # not constant: LayerNorm'd h sums to 0
        after = m.score_all(ids[:, -1:] * 0 + 5)
        assert torch.equal(m(ids[:, -1:] * 0 + 5)[:, -1], h)
    moved = (after - before).abs()[0] > 1e-6
    assert moved[:4].all() and not moved[4:].any()
    # the plain ID model is the same model minus the code rows: every other weight starts equal
    plain = model(dropout=0.0, sid_levels=L).state_dict()
    assert all(torch.equal(v, plain[k]) for k, v in m.state_dict().items() if not k.startswith("sid_code_emb"))


def test_id_plus_sid_trains_the_code_rows_of_input_and_target_items_and_is_checked():
    P = N_ITEMS
    ids = torch.tensor([[P, P, P, P, P, P, 5, 6]])  # items 5, 6 in, 7 the last target
    targets = torch.tensor([[P, P, P, P, P, P, 6, 7]])
    m = model(dropout=0.0, sid_levels=L, sid_codebook_size=5, item_repr="id+sid")
    m.loss(ids, targets).loss.backward()
    grad = m.sid_code_emb.weight.grad.abs().sum(dim=-1)
    # CE scores the whole catalogue, so every code row in use gets a gradient; the no-code row stays zero
    used = {lvl * 5 + int(c) for item in range(N_ITEMS) for lvl, c in enumerate(codes()[item]) if c >= 0}
    assert all(grad[r] > 0 for r in used) and grad[-1] == 0
    with pytest.raises(ValueError, match="item_repr='id\\+sid' needs semantic IDs"):
        SASRecConfig(num_items=N_ITEMS, item_repr="id+sid")
    with pytest.raises(ValueError, match="item_repr"):
        SASRecConfig(num_items=N_ITEMS, item_repr="sid")  # type: ignore[arg-type]
