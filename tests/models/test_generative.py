"""Unit tests for sidforge.models.generative: token layout, the prefix trie, constrained beam search against
exhaustive scoring (fixed- and variable-length IDs), and a tiny planted task the model learns (CPU, seconds)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from sidforge.models import generative
from sidforge.models.generative import (
    BOS,
    EOS,
    PAD,
    TIGER,
    ItemTrie,
    TIGERConfig,
    beam_search,
    code_tokens,
    score_items,
    sid_tokens,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Variable-length IDs (ADA-SID's sparse router): [0] is a prefix of [0, 1], which is a prefix of [0, 1, 2].
VARIABLE = torch.tensor([[0, -1, -1], [0, 1, -1], [0, 1, 2], [1, -1, -1], [1, 2, 0], [2, 2, -1], [2, 0, 1],
                         [3, 3, 3], [3, 3, -1]])


def tiny_model(level_sizes: tuple[int, ...], seed: int = 0, sharpen: float = 30.0, **overrides: object) -> TIGER:
    """A random model in float64 whose output logits are spread out (so items get clearly different scores)."""
    torch.manual_seed(seed)
    fields = dict(level_sizes=level_sizes, max_history=6, d_model=16, num_layers=2, num_heads=2, head_dim=8,
                  ffn_hidden=32, dropout=0.0)
    fields.update(overrides)
    model = TIGER(TIGERConfig(**fields)).double().eval()  # type: ignore[arg-type]
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model


def unique_codes(n: int, level_sizes: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    space = torch.cartesian_prod(*(torch.arange(s) for s in level_sizes))  # every ID
    return space[torch.randperm(len(space), generator=g)[:n]]


def histories(codes: torch.Tensor, level_sizes: tuple[int, ...], batch: int, length: int,
              seed: int = 0) -> torch.Tensor:
    """(batch, length, L) token histories of random catalogue items; the first rows are left-padded."""
    g = torch.Generator().manual_seed(seed)
    hist = code_tokens(codes, level_sizes)[torch.randint(0, len(codes), (batch, length), generator=g)]
    hist[0, : length - 1] = PAD  # one item only
    hist[1, :2] = PAD
    return hist


# ----------------------------------------------------------------------------------------------
# tokens and the trie


def test_config_checks_and_vocabulary_layout():
    c = TIGERConfig(level_sizes=[4, 5, 3], user_tokens=7)
    assert c.level_sizes == (4, 5, 3) and c.max_len == 3
    assert c.output_vocab == 3 + 12 and c.vocab_size == 3 + 12 + 7 and c.user_offset == 15
    with pytest.raises(ValueError, match="level_sizes"):
        TIGERConfig(level_sizes=())
    with pytest.raises(ValueError, match="dropout"):
        TIGERConfig(level_sizes=(4,), dropout=1.0)
    # level l's code c is token offset[l] + c: the same code at two levels is two tokens
    tok = code_tokens(torch.tensor([[0, 0, 0], [3, 4, -1]]), c.level_sizes)
    assert tok.tolist() == [[3, 7, 12], [6, 11, PAD]]
    assert sid_tokens(torch.tensor([[0, 0, 0], [3, 4, -1]]), c.level_sizes).tolist() == [[3, 7, 12, EOS],
                                                                                          [6, 11, EOS, PAD]]


@pytest.mark.parametrize("codes, match", [([[0, 5]], "outside"), ([[-1, 1]], "no code"),
                                          ([[0, -1, 1]], "right only")])
def test_bad_codes_are_rejected(codes, match):
    with pytest.raises(ValueError, match=match):
        code_tokens(torch.tensor(codes), (3, 3, 3))


def test_duplicate_ids_are_rejected():
    with pytest.raises(ValueError, match="not unique"):
        ItemTrie(torch.tensor([[0, 1], [1, 1], [0, 1]]), (2, 2))


def test_trie_mask_allows_exactly_the_prefixes_of_real_ids():
    sizes = (2, 3)
    trie = ItemTrie(torch.tensor([[0, 1], [0, 2], [1, 0]]), sizes, item_ids=torch.tensor([10, 11, 12]))
    a0, a1 = 3, 5  # offsets of level 0 and level 1
    root = torch.tensor([0])
    assert torch.nonzero(trie.allowed(root)[0]).flatten().tolist() == [a0 + 0, a0 + 1]
    after0 = trie.step(root, torch.tensor([a0 + 0]))
    after1 = trie.step(root, torch.tensor([a0 + 1]))
    assert torch.nonzero(trie.allowed(after0)[0]).flatten().tolist() == [a1 + 1, a1 + 2]
    assert torch.nonzero(trie.allowed(after1)[0]).flatten().tolist() == [a1 + 0]
    # invalid prefixes: a level-1 token at the root, [0, 0], [1, 1]
    assert trie.step(root, torch.tensor([a1 + 0])).item() == -1
    assert trie.step(after0, torch.tensor([a1 + 0])).item() == -1
    assert trie.step(after1, torch.tensor([a1 + 1])).item() == -1
    # a complete ID allows only EOS; a prefix with a single item below it already names that item
    full = trie.step(after0, torch.tensor([a1 + 2]))
    assert torch.nonzero(trie.allowed(full)[0]).flatten().tolist() == [EOS]
    assert trie.final_item[full].item() == 11 and trie.final_item[after1].item() == 12
    assert trie.final_item[after0].item() == -1 and trie.final_item[0].item() == -1
    # batched: one row per prefix
    mask = trie.allowed(torch.cat([root, after0, after1, full]))
    assert mask.shape == (4, trie.vocab_size) and mask.sum(1).tolist() == [2, 2, 1, 1]


def test_trie_handles_ids_that_are_prefixes_of_others():
    sizes = (4, 4, 4)
    trie = ItemTrie(VARIABLE, sizes)
    tok = sid_tokens(VARIABLE, sizes)
    node = torch.zeros(1, dtype=torch.long)
    for t in tok[1][:2]:  # after the tokens of [0, 1] both EOS ([0, 1] ends) and code 2 ([0, 1, 2]) are allowed
        node = trie.step(node, t.view(1))
    assert set(torch.nonzero(trie.allowed(node)[0]).flatten().tolist()) == {EOS, 3 + 4 + 4 + 2}
    assert trie.final_item[node].item() == -1  # two items below: not decided yet
    leaf = trie.step(node, torch.tensor([EOS]))
    assert trie.final_item[leaf].item() == 1


# ----------------------------------------------------------------------------------------------
# beam search and exhaustive scoring


def test_beam_search_agrees_with_exhaustive_scoring_on_a_small_catalogue():
    sizes = (6, 8)
    codes = unique_codes(30, sizes)
    model = tiny_model(sizes)
    hist = histories(codes, sizes, batch=5, length=4)
    trie = ItemTrie(codes, sizes)

    exact = score_items(model, hist, codes)  # (5, 30)
    torch.testing.assert_close(exact.exp().sum(1), torch.ones(5, dtype=exact.dtype))  # a distribution over items
    items, scores = beam_search(model, hist, trie, beam_size=30, top_k=30)
    expected_scores, expected_items = exact.sort(dim=1, descending=True)
    assert torch.equal(items, expected_items)
    torch.testing.assert_close(scores, expected_scores)


def test_beam_search_agrees_with_exhaustive_scoring_on_variable_length_ids():
    sizes = (4, 4, 4)
    model = tiny_model(sizes, seed=1)
    hist = histories(VARIABLE, sizes, batch=4, length=3, seed=1)
    exact = score_items(model, hist, VARIABLE)
    torch.testing.assert_close(exact.exp().sum(1), torch.ones(4, dtype=exact.dtype))
    items, scores = beam_search(model, hist, ItemTrie(VARIABLE, sizes), beam_size=len(VARIABLE),
                                top_k=len(VARIABLE))
    expected_scores, expected_items = exact.sort(dim=1, descending=True)
    assert torch.equal(items, expected_items)
    torch.testing.assert_close(scores, expected_scores)


@pytest.mark.parametrize("kind", ["fixed", "variable"])
@pytest.mark.parametrize("beam_size, top_k", [(2, 2), (3, 8), (5, 5)])
def test_every_beam_output_is_a_real_item_scored_exactly(kind, beam_size, top_k):
    if kind == "fixed":  # three levels and a collision digit: TIGER-style IDs
        sizes = (4, 4, 3, 3)
        base = unique_codes(40, (4, 4, 3))
        codes = torch.cat([base, torch.zeros(40, 1, dtype=torch.long)], dim=1)
        codes[::5, -1] = 1  # a few items carry digit 1 (their codes alone would collide with a digit-0 item)
        codes[::5, 2] = codes[1::5, 2][: len(codes[::5])]
        codes[::5, :2] = codes[1::5, :2][: len(codes[::5])]
    else:
        sizes, codes = (4, 4, 4), VARIABLE
    item_ids = torch.arange(len(codes)) * 7 + 100  # items need not be numbered 0..N-1
    model = tiny_model(sizes, seed=2, sharpen=5.0)
    hist = histories(codes, sizes, batch=6, length=5, seed=2)
    items, scores = beam_search(model, hist, ItemTrie(codes, sizes, item_ids=item_ids), beam_size, top_k)

    assert items.shape == scores.shape == (6, top_k)
    found = items >= 0
    # at least one item per beam (or per slot): live prefixes are disjoint and each holds an item
    assert found[:, : min(beam_size, top_k)].all() and (found[:, :-1] >= found[:, 1:]).all()
    assert torch.isin(items[found], item_ids).all()  # every output is a real item ...
    for row in items:
        assert len(row[row >= 0].unique()) == int((row >= 0).sum())  # ... listed once
    assert (scores[:, :-1] >= scores[:, 1:]).all() and torch.isinf(scores[~found]).all()  # sorted by score
    exact = score_items(model, hist, codes)  # ... with its exact constrained log-probability
    rows = (items.clamp(min=100) - 100) // 7
    torch.testing.assert_close(scores[found], exact.gather(1, rows)[found])


@pytest.mark.parametrize("kind", ["fixed", "variable"])
def test_cached_decoding_equals_re_decoding_every_prefix(kind):
    sizes = (5, 6, 4) if kind == "fixed" else (4, 4, 4)
    codes = unique_codes(60, sizes, seed=3) if kind == "fixed" else VARIABLE
    model = tiny_model(sizes, seed=3, sharpen=5.0)
    hist = histories(codes, sizes, batch=5, length=4, seed=3)
    # one step at a time: the cached logits of the newest token are the full decode's last position
    memory, key_mask = model.encode(hist)
    kv = model.memory_kv(memory)
    prefix = torch.randint(0, 4, (5, 3, 3))
    inputs = torch.cat([torch.full((5, 3, 1), BOS), prefix], dim=2)
    past = None
    for t in range(inputs.shape[2]):
        logits, past = model.decode_step(inputs[:, :, t], t, kv, key_mask, past)
        torch.testing.assert_close(logits, model.decode(inputs[:, :, : t + 1], kv, key_mask)[:, :, -1])
    # and the beam search, whose beams are reordered between steps, returns the same lists
    trie = ItemTrie(codes, sizes)
    for beam_size, top_k in ((3, 10), (8, 8)):
        cached = beam_search(model, hist, trie, beam_size, top_k)
        plain = beam_search(model, hist, trie, beam_size, top_k, cache=False)
        assert torch.equal(cached[0], plain[0])
        torch.testing.assert_close(cached[1], plain[1])


def test_beam_search_ignores_extra_left_padding_and_needs_matching_vocabularies():
    sizes = (5, 5)
    codes = unique_codes(20, sizes)
    model = tiny_model(sizes)
    hist = histories(codes, sizes, batch=3, length=3)
    trie = ItemTrie(codes, sizes)
    padded = torch.cat([torch.zeros(3, 2, 2, dtype=torch.long), hist], dim=1)
    a, sa = beam_search(model, hist, trie, 4, 6)
    b, sb = beam_search(model, padded, trie, 4, 6)
    assert torch.equal(a, b)
    torch.testing.assert_close(sa, sb)
    with pytest.raises(ValueError, match="vocabulary"):
        beam_search(model, hist, ItemTrie(unique_codes(20, (5, 6)), (5, 6)), 4)


def test_user_token_is_required_exactly_when_configured():
    sizes = (4, 4)
    codes = unique_codes(12, sizes)
    model = tiny_model(sizes, user_tokens=10)
    hist = histories(codes, sizes, batch=2, length=3)
    trie = ItemTrie(codes, sizes)
    with pytest.raises(ValueError, match="user"):
        beam_search(model, hist, trie, 4)
    a = score_items(model, hist, codes, user=torch.tensor([0, 0]))
    b = score_items(model, hist, codes, user=torch.tensor([3, 9]))
    assert not torch.allclose(a, b)  # the user token reaches the scores
    items, _ = beam_search(model, hist, trie, 12, user=torch.tensor([3, 9]))
    assert torch.equal(items, b.argsort(dim=1, descending=True))


# ----------------------------------------------------------------------------------------------
# learning


def test_loss_decreases_and_beam_search_recovers_a_planted_next_item():
    """Item i is always followed by item (i + 1) mod N: the model learns it and generates the right ID."""
    torch.manual_seed(0)
    sizes = (4, 6)
    n = 24
    codes = unique_codes(n, sizes, seed=3)
    model = TIGER(TIGERConfig(level_sizes=sizes, max_history=4, d_model=32, num_layers=1, num_heads=2, head_dim=16,
                              ffn_hidden=64, dropout=0.0))
    table, targets = code_tokens(codes, sizes), sid_tokens(codes, sizes)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = torch.randint(0, n, (256,))
    seq = (start[:, None] + torch.arange(5)) % n  # (256, 5): 4 history items and the next one
    hist, nxt = table[seq[:, :4]], targets[seq[:, 4]]
    losses = []
    for _ in range(150):
        out = model.loss(hist, nxt)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert out.metrics["id_acc"] > 0.9 and out.metrics["num_tokens"] == 256 * 3
    items, _ = beam_search(model, hist[:64], ItemTrie(codes, sizes), beam_size=5, top_k=5)
    assert (items[:, 0] == seq[:64, 4]).float().mean() > 0.9
    assert model.training  # beam search restored the training mode


def test_models_do_not_import_ray():
    tree = ast.parse(Path(generative.__file__).read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= {"__future__", "dataclasses", "torch"}, roots
