"""expert_union: every pair once, monotone offsets, experts == unique ids, deterministic order."""
import pytest
import torch

from moespec import ops


@pytest.mark.parametrize("T,k,E", [(1, 1, 8), (1, 8, 128), (3, 2, 8), (17, 6, 64), (64, 8, 256), (64, 4, 60)])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_union_properties(gen, T, k, E, id_dtype):
    # Distinct ids per token, as a top-k router produces.
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(id_dtype)
    u = ops.expert_union(ids, E)

    assert u.experts.dtype == torch.int32 and u.offsets.dtype == torch.int32
    assert u.pair_token.dtype == torch.int32 and u.pair_slot.dtype == torch.int32
    assert torch.equal(u.experts.long(), torch.unique(ids.long()))
    assert u.offsets.shape == (u.size + 1,)
    assert int(u.offsets[0]) == 0 and int(u.offsets[-1]) == T * k
    assert bool((u.offsets[1:] > u.offsets[:-1]).all()), "every union expert has at least one pair"

    pairs = list(zip(u.pair_token.tolist(), u.pair_slot.tolist()))
    assert sorted(pairs) == [(t, s) for t in range(T) for s in range(k)], "every (token, slot) pair exactly once"
    for j, e in enumerate(u.experts.tolist()):
        lo, hi = int(u.offsets[j]), int(u.offsets[j + 1])
        seg = pairs[lo:hi]
        assert all(int(ids[t, s]) == e for t, s in seg), "pair grouped under the wrong expert"
        assert seg == sorted(seg), "pairs of one expert must be ordered by token, then slot"
    for t in range(T):
        for s in range(k):
            p = int(u.pair_position[t, s])
            assert (int(u.pair_token[p]), int(u.pair_slot[p])) == (t, s), "pair_position is not the inverse map"


def test_union_repeated_ids_and_determinism(gen):
    # Routing that repeats an expert inside one token (e.g. after truncation bookkeeping) is still grouped.
    ids = torch.randint(0, 5, (9, 4), generator=gen)
    a, b = ops.expert_union(ids, 5), ops.expert_union(ids.clone(), 5)
    for f in ("experts", "offsets", "pair_token", "pair_slot", "pair_position"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    counts = torch.bincount(ids.reshape(-1), minlength=5)
    assert (a.offsets[1:] - a.offsets[:-1]).tolist() == counts[counts > 0].tolist()
