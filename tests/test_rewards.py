import torch

from lit_route.rewards import (
    kl_per_sequence,
    ordered_pairs,
    pairwise_rewards,
    rloo_advantages,
    score_matrix,
    upper_pairs,
    verdict_logits,
)


def test_rloo_by_hand():
    r = torch.tensor([[1.0, 2.0, 6.0]])
    # A_0 = 1 - (2+6)/2 = -3 ; A_1 = 2 - 3.5 = -1.5 ; A_2 = 6 - 1.5 = 4.5
    assert torch.allclose(rloo_advantages(r), torch.tensor([[-3.0, -1.5, 4.5]]))


def test_rloo_identity_for_antisymmetric_scores():
    torch.manual_seed(0)
    for k in (2, 3, 5):
        raw = torch.randn(4, k, k)
        s, _ = score_matrix(raw, torch.ones(4, k, k))
        r = pairwise_rewards(s)
        assert torch.allclose(r.sum(-1), torch.zeros(4), atol=1e-6)  # antisymmetry: rewards sum to zero
        assert torch.allclose(rloo_advantages(r), k / (k - 1) * r, atol=1e-6)


def test_score_matrix_and_rewards_by_hand():
    p = torch.tensor([[[0.0, 2.0, 1.0], [0.0, 0.0, -1.0], [3.0, 1.0, 0.0]]])
    u = torch.tensor([[[9.0, 1.0, 2.0], [3.0, 9.0, 4.0], [2.0, 6.0, 9.0]]])
    s, uu = score_matrix(p, u)
    assert torch.allclose(s, torch.tensor([[[0.0, 1.0, -1.0], [-1.0, 0.0, -1.0], [1.0, 1.0, 0.0]]]))
    assert torch.allclose(uu, torch.tensor([[[0.0, 2.0, 2.0], [2.0, 0.0, 5.0], [2.0, 5.0, 0.0]]]))
    assert torch.allclose(pairwise_rewards(s), torch.tensor([[0.0, -1.0, 1.0]]))


def test_pairs_and_verdicts():
    i, j = ordered_pairs(3)
    assert list(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    a, b = upper_pairs(3)
    assert list(zip(a.tolist(), b.tolist(), strict=True)) == [(0, 1), (0, 2), (1, 2)]
    assert verdict_logits(torch.tensor([1.0, 0.5, 0.0]), 2.0).tolist() == [2.0, 0.0, -2.0]


def test_kl_estimators():
    logp = torch.tensor([[-1.0, -2.0, -5.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert torch.allclose(kl_per_sequence(logp, ref, mask, "k1"), torch.tensor([0.5 - 1.0]))
    d = torch.tensor([-0.5, 1.0])
    assert torch.allclose(kl_per_sequence(logp, ref, mask, "k3"), (torch.exp(d) - d - 1).sum().unsqueeze(0))
    assert kl_per_sequence(logp, ref, mask, "k3").item() >= 0
