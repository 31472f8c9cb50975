"""``ResumableSampler``: a shuffled, sharded sampler that can start an epoch where a killed run stopped."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """Each epoch, one seeded permutation of the dataset shared by all ranks; rank ``r`` takes every
    ``num_replicas``-th index from position ``r``, after skipping the ``skip`` samples that a previous run had
    already consumed in epoch ``skip_epoch``.

    Being a ``DistributedSampler``, Lightning keeps it under DDP (instead of putting its own in its place) and
    calls :meth:`set_epoch` at every epoch start. The order depends on ``seed + epoch`` only, so a resumed run
    sees exactly the samples that the interrupted one had not reached yet.

    Its length is the whole epoch's, skipped samples included, as for any loader that resumes mid-epoch
    (torchdata's ``StatefulDataLoader`` too): a Trainer restores how many batches of the epoch were done and
    ends the epoch when that count reaches the length, so a length without the skipped samples would end a
    resumed epoch early by as many batches as were skipped.

    Args:
        dataset: Anything with a length.
        num_replicas: Number of ranks.
        rank: This rank.
        seed: Seed of the permutations.
        shuffle: Shuffle (else the dataset order).
        skip: Global number of samples of epoch ``skip_epoch`` consumed before this run.
        skip_epoch: The epoch ``skip`` refers to.
        current_epoch: Where :meth:`set_epoch` takes the epoch from instead of its argument (a Trainer's
            ``current_epoch``): resumed from a checkpoint written when ``max_steps`` stopped a run mid-epoch,
            Lightning passes the number of epochs it has *processed*, one more than the epoch it continues.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 skip: int = 0, skip_epoch: int = 0, current_epoch: Callable[[], int] | None = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        if skip < 0 or skip % num_replicas:
            raise ValueError(f"skip: expected a non-negative multiple of num_replicas={num_replicas}, got {skip}")
        self.skip, self.skip_epoch = skip, skip_epoch
        self.current_epoch = current_epoch

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(self.current_epoch() if self.current_epoch is not None else epoch)

    def _start(self) -> int:
        return min(self.skip, self.total_size) if self.epoch == self.skip_epoch else 0

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.dataset), generator=generator).tolist()
        else:
            order = list(range(len(self.dataset)))
        order = order[self._start() : self.total_size]
        return iter(order[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        """Samples of a whole epoch on this rank, those skipped included (see the class docstring)."""
        return self.num_samples


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose position the owning datamodule keeps.

    The datamodule counts what training consumed and restores it from the checkpoint before this loader is
    built, so the sampler already starts at the right place; the state methods only tell Lightning that the
    loader resumes mid-epoch (instead of warning that it does not).

    Args:
        position: Returns the datamodule's ``{"epoch", "consumed"}``.
        *args, **kwargs: ``DataLoader`` arguments.
    """

    def __init__(self, *args, position: Callable[[], dict], **kwargs):
        super().__init__(*args, **kwargs)
        self._position = position

    def state_dict(self) -> dict:
        return dict(self._position())

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to do: the datamodule's own state (restored first) already placed the sampler."""
