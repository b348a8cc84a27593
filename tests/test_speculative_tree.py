"""Draft trees, tree masks, tree verification forward, acceptance and KV compaction."""
import pytest
import torch

from test_speculative_support import spec_single_thread  # noqa: F401  (autouse)
from test_speculative_support import DraftConfig, DraftTree, one_thread, tiny_dense, tiny_moe

from moespec.integrations.hf_compat import forward_kwargs
from moespec.speculative.drafters import DraftModelDrafter, PromptLookupDrafter
from moespec.speculative.verify import accept_greedy, cache_length, compact_cache, tree_forward


def test_draft_config_shapes():
    c = DraftConfig.chain(5)
    assert (c.depth, c.branching, c.nodes, c.size) == (5, 1, 5, 5) and c.is_chain
    t = DraftConfig.tree(4, 3, 10)
    assert t.sized(6) == DraftConfig(depth=4, branching=3, nodes=6)
    assert t.sized(2).depth == 2 and t.sized(0).nodes == 0
    assert DraftConfig.coerce(3) == DraftConfig.chain(3)
    assert DraftConfig.coerce({"depth": 2, "branching": 2}).nodes == 4
    with pytest.raises(ValueError):
        DraftConfig(depth=-1)


def test_tree_structure_mask_positions():
    # root -> a(0) -> c(2);  root -> b(1) -> d(3) -> e(4)
    tree = DraftTree([10, 11, 12, 13, 14], [-1, -1, 0, 1, 3])
    assert tree.depths == [1, 1, 2, 2, 3] and tree.depth == 3
    assert tree.children(-1) == [0, 1] and tree.path_to(4) == [1, 3, 4]
    mask = tree.attention_mask(past=3, dtype=torch.float32)
    assert mask.shape == (1, 1, 6, 9) and mask.dtype == torch.float32
    allowed = mask[0, 0] == 0
    assert allowed[:, :3].all()  # everyone sees the prefix
    # row for node 4 (e): root, b, d, e
    assert allowed[5, 3:].tolist() == [True, False, True, False, True, True]
    assert allowed[3, 3:].tolist() == [True, True, False, True, False, False]
    assert (mask[0, 0][~allowed] == torch.finfo(torch.float32).min).all()
    assert tree.position_ids(past=3).tolist() == [[3, 4, 4, 5, 5, 6]]
    with pytest.raises(ValueError):
        DraftTree([1, 2], [1, -1])  # child before parent


def test_from_paths_merges_prefixes_and_caps():
    tree = DraftTree.from_paths([[1, 2, 3], [1, 2, 4], [5, 6]], max_nodes=5)
    assert tree.tokens == [1, 2, 3, 4, 5] and tree.parents == [-1, 0, 1, 1, -1]
    assert DraftTree.chain([7, 8, 9]).is_chain()


def test_accept_greedy_picks_longest_matching_path():
    tree = DraftTree([10, 11, 12, 13, 14], [-1, -1, 0, 1, 3])
    V = 20
    logits = torch.zeros(6, V)
    # argmax per row: root->11 (b), a->12, b->13 (d), c->0, d->7 (e rejected), e->1
    for row, tok in enumerate([11, 12, 13, 0, 7, 1]):
        logits[row, tok] = 1.0
    acc = accept_greedy(tree, logits)
    assert acc.path == [1, 3] and acc.tokens == [11, 13] and acc.bonus == 7
    logits[0] = 0
    logits[0, 3] = 1.0  # nothing matches at the root
    acc = accept_greedy(tree, logits)
    assert acc.path == [] and acc.bonus == 3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tree_forward_matches_sequential_paths_and_compaction(attn):
    """Tree logits equal each root-to-leaf path decoded on its own; compaction keeps a valid cache."""
    from transformers import DynamicCache

    with one_thread():
        model = tiny_moe(seed=3)
        model.config._attn_implementation = attn
        prompt = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
        tree = DraftTree([5, 6, 7, 8, 9, 10], [-1, -1, 0, 0, 1, 4])
        root = 42
        tol = 1e-9 if attn == "sdpa" else 1e-6  # eager takes its softmax in fp32 even for fp64 models
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=prompt, **forward_kwargs(model, cache, use_cache=True))
        logits = tree_forward(model, cache, tree, root=root)
        assert cache_length(cache) == 9 + 7
        for leaf in (2, 3, 5):
            path = tree.path_to(leaf)
            seq = torch.cat([prompt, torch.tensor([[root] + [tree.tokens[i] for i in path]])], dim=1)
            with torch.no_grad():
                ref = model(input_ids=seq).logits[0, -len(path) - 1:]
            rows = [0] + [i + 1 for i in path]
            torch.testing.assert_close(logits[rows], ref, rtol=0, atol=tol)
        # Compact to root + path [1, 4, 5] and continue: same as decoding that sequence from scratch.
        path = [1, 4, 5]
        compact_cache(cache, torch.tensor(list(range(10)) + [10 + i for i in path]))
        assert cache_length(cache) == 13
        nxt = torch.tensor([[3]])
        with torch.no_grad():
            got = model(input_ids=nxt, **forward_kwargs(model, cache, use_cache=True)).logits[0, -1]
            seq = torch.cat([prompt, torch.tensor([[root] + [tree.tokens[i] for i in path] + [3]])], dim=1)
            ref = model(input_ids=seq).logits[0, -1]
        torch.testing.assert_close(got, ref, rtol=0, atol=tol)


def test_draft_model_tree_is_eagle2_shaped():
    """Top-k per depth by cumulative log-prob, best N kept, parents first, distinct siblings."""
    with one_thread():
        small = tiny_dense(seed=5, sharp=4.0)
        d = DraftModelDrafter(small)
        ctx = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(1))
        d.begin(ctx)
        cfg = DraftConfig.tree(depth=4, branching=3, nodes=10)
        tree = d.propose(ctx, cfg)
        assert 0 < len(tree) <= 10 and tree.depth <= 4
        assert all(p < i for i, p in enumerate(tree.parents))
        for node in [-1] + list(range(len(tree))):
            kids = [tree.tokens[c] for c in tree.children(node)]
            assert len(kids) == len(set(kids)) and len(kids) <= 3
        # Cumulative scores never increase along a path, and the kept set is the top-N.
        for i, p in enumerate(tree.parents):
            if p >= 0:
                assert tree.scores[i] <= tree.scores[p] + 1e-12
        # Depth-1 nodes are the drafter's top-3 tokens.
        with torch.no_grad():
            top = small(input_ids=ctx.view(1, -1)).logits[0, -1].topk(3).indices.tolist()
        assert set(tree.tokens[c] for c in tree.children(-1)) <= set(top)
        # Committing a path keeps the draft cache consistent with context + fed accepted nodes.
        path = tree.path_to(max(range(len(tree)), key=lambda i: tree.depths[i]))
        d.commit(ctx, tree, path)
        assert cache_length(d.cache) == len(d.ids) >= len(ctx)


def test_prompt_lookup_chain_and_tree():
    d = PromptLookupDrafter(max_ngram=2, num_tokens=3)
    ctx = torch.tensor([1, 2, 3, 4, 9, 1, 2, 5, 6, 7, 1, 2])
    chain = d.propose(ctx, DraftConfig.chain(3))
    assert chain.tokens == [5, 6, 7] and chain.is_chain()  # most recent match of the bigram (1, 2)
    tree = d.propose(ctx, DraftConfig.tree(depth=3, branching=2, nodes=6))
    assert tree.tokens == [5, 6, 7, 3, 4, 9] and tree.parents == [-1, 0, 1, -1, 3, 4]
    assert len(d.propose(torch.tensor([1, 2, 3]), DraftConfig.chain(3))) == 0


def test_draft_cache_after_commit_matches_fresh_drafter():
    """After commit (compaction to the accepted path), the next proposal equals a fresh drafter's."""
    small = tiny_dense(seed=6, sharp=4.0)
    g = torch.Generator().manual_seed(2)
    ctx = torch.randint(0, 128, (10,), generator=g)
    cfg = DraftConfig.tree(depth=4, branching=2, nodes=9)
    d = DraftModelDrafter(small)
    d.begin(ctx)
    for step in range(4):
        tree = d.propose(ctx, cfg)
        # Accept the deepest path minus its leaf (so fed, unfed and rejected nodes all occur).
        deepest = max(range(len(tree)), key=lambda i: (tree.depths[i], -i))
        path = tree.path_to(deepest)[: max(0, tree.depths[deepest] - 1 - step % 2)]
        d.commit(ctx, tree, path)
        assert cache_length(d.cache) == len(d.ids)
        bonus = int(torch.randint(0, 128, (), generator=g))
        ctx = torch.cat([ctx, torch.tensor([tree.tokens[i] for i in path] + [bonus])])
        fresh = DraftModelDrafter(small)
        fresh.begin(ctx)
        a, b = d.propose(ctx, cfg), fresh.propose(ctx, cfg)
        assert a.tokens == b.tokens and a.parents == b.parents
        torch.testing.assert_close(torch.tensor(a.scores), torch.tensor(b.scores), rtol=0, atol=1e-9)
        d.commit(ctx, a, [])  # nothing accepted: back to the context only


def test_generate_edge_cases_and_stats_json():
    import json

    from moespec.speculative.engine import generate

    model = tiny_moe(seed=4, sharp=4.0)
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    out, stats = generate(model, prompt, max_new_tokens=0)
    assert torch.equal(out, prompt) and stats.iterations == []
    out, stats = generate(model, prompt[0], max_new_tokens=1)  # 1-D prompts are accepted
    assert out.shape == (1, 7) and stats.iterations == []
    first = int(out[0, -1])
    out, _ = generate(model, prompt, max_new_tokens=5, eos_token_id=first)
    assert out.shape == (1, 7)  # stopped right after the eos
    kw = dict(drafter=PromptLookupDrafter(), max_new_tokens=8, do_sample=True, temperature=0.7, seed=9, draft=3)
    a, sa = generate(model, prompt, **kw)
    b, _ = generate(model, prompt, **kw)
    assert torch.equal(a, b)  # seeded sampling is reproducible
    d = json.loads(sa.to_json())
    assert d["summary"]["new_tokens"] == 8 and len(d["iterations"]) == len(sa.iterations)
    rec = d["iterations"][0]
    for key in ("draft_size", "accepted", "draft_time_s", "verify_time_s", "iter_time_s", "layers", "expert_bytes"):
        assert key in rec
    with pytest.raises(TypeError):
        generate(model, prompt, drafter=object(), max_new_tokens=2)
    with pytest.raises(ValueError):
        generate(model, prompt, max_new_tokens=2, do_sample=True, temperature=0.0)
