import torch

from lit_route.preference.metrics import PreferenceMetrics, auroc, average_ranks


def test_average_ranks_share_ties():
    # values 10, 30, 10, 20 -> sorted 10, 10, 20, 30 -> ranks (1+2)/2 = 1.5, 4, 1.5, 3
    assert torch.equal(average_ranks(torch.tensor([10.0, 30.0, 10.0, 20.0])),
                       torch.tensor([1.5, 4.0, 1.5, 3.0], dtype=torch.float64))


def test_auroc_by_hand():
    # positives score 3 and 1, negatives 2 and 0: of the 4 (pos, neg) pairs, 3 are ordered right -> 0.75
    assert auroc(torch.tensor([3.0, 1.0, 2.0, 0.0]), torch.tensor([1, 1, 0, 0])) == 0.75
    # a tie between a positive and a negative counts one half: (1 + 0.5) / 2
    assert auroc(torch.tensor([2.0, 1.0, 1.0]), torch.tensor([1, 1, 0])) == 0.75
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1])) == 0.5


def test_auroc_of_large_uncertainties_is_not_squashed():
    # ū in [12, 36] that separates errors perfectly: a sigmoid on such inputs turns them into ties (0.63 reported)
    u = torch.linspace(12.0, 36.0, 40)
    d = torch.where(u > 24.0, -1.0, 1.0)  # the 20 most uncertain pairs are the errors
    metrics = PreferenceMetrics()
    metrics.update(d[:25], u[:25])  # two updates: ranks are taken over everything seen, not per batch
    metrics.update(d[25:], u[25:])
    out = metrics.compute()
    assert out["auroc_uncertainty"] == 1.0
    assert out["accuracy"] == 0.5
