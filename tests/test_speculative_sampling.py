"""Speculative sampling keeps the target distribution (chi-square, fixed seeds, tiny vocabularies)."""
import pytest
import torch

from test_speculative_support import spec_single_thread  # noqa: F401  (autouse)
from test_speculative_support import (DraftConfig, DraftModelDrafter, DraftTree, PromptLookupDrafter, chi_square_pvalue,
                               generate, one_thread, perturbed_copy, tiny_moe)

from moespec.speculative.verify import accept_sampling, target_probs

P_MIN = 1e-3  # seeds are fixed, so this is a deterministic check with a generous margin


def test_accept_sampling_matches_target_joint():
    """Unit level: first two emitted tokens of one verification follow p(x1) p(x2 | x1) exactly."""
    V = 5
    g = torch.Generator().manual_seed(0)
    # root -> 1 (node 0) -> {0 (node 2), 2 (node 3)};  root -> 3 (node 1) -> 4 (node 4) -> 4 (node 5)
    tree = DraftTree([1, 3, 0, 2, 4, 4], [-1, -1, 0, 0, 1, 4])
    logits = torch.randn(len(tree) + 1, V, generator=g, dtype=torch.float64) * 1.5
    temperature = 0.8
    p = target_probs(logits, temperature)
    row_of = {1: 1, 3: 2}  # first token -> the row holding p(x2 | x1)
    # Cells: (x1, x2) for x1 in the tree, (x1, "none") otherwise (only one token emitted).
    expected = torch.zeros(V, V + 1, dtype=torch.float64)
    for x1 in range(V):
        if x1 in row_of:
            expected[x1, :V] = p[0, x1] * p[row_of[x1]]
        else:
            expected[x1, V] = p[0, x1]
    counts = torch.zeros(V, V + 1)
    rng = torch.Generator().manual_seed(1)
    for _ in range(8000):
        acc = accept_sampling(tree, logits, temperature, rng)
        emitted = acc.tokens + [acc.bonus]
        x2 = emitted[1] if len(emitted) > 1 else V
        counts[emitted[0], x2] += 1
    assert chi_square_pvalue(counts, expected) > P_MIN


def _exact_joint_t2_t3(target, prompt, V, temperature):
    """P(t2, t3) = sum_t1 P(t1) P(t2|t1) P(t3|t1,t2), from one batched forward over all (t1, t2)."""
    S = prompt.shape[1]
    with torch.no_grad():
        pairs = torch.cartesian_prod(torch.arange(V), torch.arange(V))
        seqs = torch.cat([prompt.expand(V * V, S), pairs], dim=1)
        probs = torch.softmax(target(input_ids=seqs).logits.double() / temperature, dim=-1)
    p1 = probs[0, S - 1]
    p2 = probs[::V, S].reshape(V, V)
    p3 = probs[:, S + 1].reshape(V, V, V)
    return torch.einsum("a,ab,abc->bc", p1, p2, p3)


@pytest.mark.parametrize("kind", ["lookup-tree", "model-tree"])
def test_speculative_sampling_end_to_end_distribution(kind):
    """Model level: tokens 2 and 3 (drafted as a tree, verified in one forward) follow the target's law."""
    V = 4
    temperature = 0.9
    with one_thread():
        target = tiny_moe(vocab=V, seed=11, sharp=30.0, experts=4, top_k=2, layers=1)
        prompt = torch.tensor([[1, 2, 3, 1, 2, 0, 1, 3, 2, 0, 0, 3]])
        S = prompt.shape[1]
        joint = _exact_joint_t2_t3(target, prompt, V, temperature)
        if kind == "lookup-tree":
            make = lambda: PromptLookupDrafter(max_ngram=1, num_tokens=2)  # noqa: E731
            n = 800
        else:
            dm = perturbed_copy(target, noise=0.5, seed=3)
            make = lambda: DraftModelDrafter(dm)  # noqa: E731
            n = 500
        counts = torch.zeros(V, V)
        accepted = 0
        for seed in range(n):
            out, stats = generate(target, prompt, drafter=make(), max_new_tokens=3, do_sample=True,
                                  temperature=temperature, seed=seed,
                                  draft=DraftConfig.tree(depth=2, branching=3, nodes=5))
            t = out[0, S:].tolist()
            counts[t[1], t[2]] += 1
            accepted += stats.iterations[0].accepted
    assert accepted > n // 4, "drafts must be accepted often for this test to mean anything"
    assert chi_square_pvalue(counts, joint) > P_MIN
