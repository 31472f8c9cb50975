"""``PreferenceDataModule``: preference pairs, encoded in both orders, for training and validation."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from lit_route.checks import check_fraction, check_nonnegative, check_optional
from lit_route.data.encoding import PairEncoder, pad_batch
from lit_route.data.holdout import prompt_key, split_by_prompt
from lit_route.data.readers import ReadReport, load_pair_dataset, pairs_from_dataset
from lit_route.data.tables import quiet_datasets

log = logging.getLogger(__name__)


class PairEncodeFn:
    """``Dataset.map`` function (batched): pair rows -> the token ids of both orders, cached by ``datasets``.

    Holds only what decides the output (tokenizer, length, template, mode), so that its fingerprint, and so the
    cache entry, changes exactly when one of them does.
    """

    def __init__(self, tokenizer, max_length: int, template: str, mode: str):
        self.tokenizer, self.max_length, self.template, self.mode = tokenizer, max_length, template, mode
        self._encoder: PairEncoder | None = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_encoder"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _encoder=None)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if self._encoder is None:
            self._encoder = PairEncoder(self.tokenizer, self.max_length, self.template, self.mode)
        out: dict[str, list] = {"ab": [], "ba": [], "truncated": []}
        for pair in pairs_from_dataset(batch):
            ab, ba = self._encoder.encode_both(pair)
            out["ab"].append(ab.input_ids)
            out["ba"].append(ba.input_ids)
            out["truncated"].append(int(ab.truncated) + int(ba.truncated))
        return out


class EncodedPairs(Dataset):
    """Each item is one pair as its two sequences: ``(x, chosen, rejected)`` and ``(x, rejected, chosen)``
    (pairwise), or ``(x, chosen)`` and ``(x, rejected)`` (pointwise); plus the loss weight.

    Args:
        pairs: A pair table from :func:`~lit_route.data.readers.load_pair_dataset` (encoded with a cached
            ``Dataset.map``) or a list of :class:`PreferencePair`.
        encoder: The pair encoder (its tokenizer, length, template and mode).
        use_strength: Weight each pair by its preference strength (1 when absent).
    """

    def __init__(self, pairs, encoder: PairEncoder, use_strength: bool = False):
        if isinstance(pairs, Sequence):
            from datasets import Dataset as HFDataset

            from lit_route.data.readers import pair_features

            rows: dict[str, list] = {name: [] for name in pair_features()}
            for pair in pairs:
                text = isinstance(pair.prompt, str)
                rows["prompt"].append(pair.prompt if text else None)
                rows["prompt_messages"].append(None if text else list(pair.prompt))
                for key in ("chosen", "rejected", "subset", "id", "strength"):
                    rows[key].append(getattr(pair, key))
                for key in ("line", "row", "error", "error_field"):
                    rows[key].append(None)
            pairs = HFDataset.from_dict(rows, features=pair_features())
        fn = PairEncodeFn(encoder.tokenizer, encoder.max_length, encoder.template, encoder.mode)
        with quiet_datasets():
            encoded = pairs.map(fn, batched=True, remove_columns=pairs.column_names)
        strengths = pairs["strength"][:] if use_strength else [None] * len(pairs)
        strengths = [s if s is not None else 1.0 for s in strengths]
        # one normaliser for the whole set (mean weight 1), never per batch: the ratio of two pairs' weights is
        # the ratio of their strengths whatever the batch size or gradient accumulation
        norm = (sum(strengths) / len(strengths)) if strengths and sum(strengths) > 0 else 1.0
        self.items = [
            (ab, ba, s / norm) for ab, ba, s in zip(encoded["ab"][:], encoded["ba"][:], strengths, strict=True)
        ]
        self.n_truncated = sum(encoded["truncated"][:])
        self.n_encoded = 2 * len(self.items)
        encoder.n_truncated += self.n_truncated
        encoder.n_encoded += self.n_encoded
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class PairCollator:
    """Stacks B pairs into 2B rows: the (chosen, rejected) orders first (label 1), then the swapped ones (0)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items) -> dict[str, torch.Tensor]:
        batch = pad_batch([it[0] for it in items] + [it[1] for it in items], self.pad_id)
        n = len(items)
        batch["labels"] = torch.cat([torch.ones(n), torch.zeros(n)])
        weights = torch.tensor([float(it[2]) for it in items])
        batch["weights"] = torch.cat([weights, weights])
        return batch


class EpochShuffle(DistributedSampler):
    """A ``DistributedSampler`` (order: a permutation seeded by ``seed + epoch``; rank r takes every world-th
    index from position r, the last shard padded) that reads the rank and world size when it is iterated or
    measured, not when it is built: a loader made before ``fabric.launch()`` is still sharded.

    Args:
        dataset: Anything with a length.
        seed: Seed of the permutations.
        world: Returns ``(rank, world size)``.
    """

    def __init__(self, dataset, seed: int, world: Callable[[], tuple[int, int]]):
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
        self._world = world

    def _place(self) -> None:
        self.rank, self.num_replicas = self._world()
        self.num_samples = math.ceil(len(self.dataset) / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self):
        self._place()
        return super().__iter__()

    def __len__(self) -> int:
        self._place()
        return self.num_samples


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs from any supported format, for ``PreferenceModule``.

    The tokenizer is the model's (taken from the trainer's LightningModule at ``setup``, or by
    :meth:`connect` without a Trainer), so that data and model can never disagree on it.

    Args:
        train: Training file(s); ``bundled:<path>`` names data shipped with the package.
        val: Validation file(s). When absent, ``val_fraction`` of the training pairs are held out.
        format: Reader (``auto`` detects it per file).
        skip_invalid: Skip malformed records (counted and reported) instead of failing.
        limit_per_file: Use at most this many pairs from each file.
        val_fraction: When ``val`` is not given, the share of the training file's prompts held out for
            validation, with all their pairs (no prompt is on both sides).
        max_length: Maximum tokens per encoded pair.
        template: Pair template: ``auto``, ``chat`` or ``plain``.
        mode: ``pairwise`` (one sequence per ordered pair) or ``pointwise`` (one sequence per response); must
            match the model's ``mode``.
        batch_size: Pairs per batch (each pair is two sequences).
        use_strength: Weight the loss by each pair's preference strength.
        num_workers: DataLoader workers.
        seed: Seed of the split and the shuffling.
    """

    def __init__(
        self,
        train: str | list[str] | None = None,
        val: str | list[str] | None = None,
        format: str = "auto",
        skip_invalid: bool = False,
        limit_per_file: int | None = None,
        val_fraction: float = 0.1,
        max_length: int = 512,
        template: str = "auto",
        mode: str = "pairwise",
        batch_size: int = 8,
        use_strength: bool = False,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("max_length", max_length), ("limit_per_file", limit_per_file)):
            check_optional(f"data.{name}", value, integer=True, positive=True)  # before torch or the tokenizer does
        check_nonnegative("data.num_workers", num_workers, integer=True)
        check_fraction("data.val_fraction", val_fraction)
        self.save_hyperparameters()
        self.train_set: EncodedPairs | None = None
        self.val_set: EncodedPairs | None = None
        self.tokenizer = None

    def connect(self, module) -> None:
        """Takes the model's tokenizer and checks that data and model agree on ``mode``.

        A Trainer's ``setup`` does this with its module; call it yourself when no Trainer drives the datamodule
        (the Fabric engine, your own loop).
        """
        model_mode = getattr(module, "mode", self.hparams.mode)
        if model_mode != self.hparams.mode:
            raise ValueError(f"data.mode={self.hparams.mode!r} but model.mode={model_mode!r}; set both to the same value")
        if self.tokenizer is None:
            self.tokenizer = module.tokenizer
        if hasattr(module, "connect_data"):  # the module reads its training pairs without a Trainer too
            module.connect_data(self)

    def _load(self, paths):
        report = ReadReport()
        pairs = load_pair_dataset(paths, self.hparams.format, self.hparams.skip_invalid, self.hparams.limit_per_file, report)
        for path, n in report.pairs_per_file.items():
            log.info("read %d pairs from %s", n, path)
        if report.skipped:  # the reader has said which (and warned for the user's own files)
            log.debug("%d invalid records skipped", len(report.skipped))
        return pairs

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None or self.val_set is not None:
            return
        if self.trainer is not None:
            self.connect(self.trainer.lightning_module)
        if self.tokenizer is None:
            raise ValueError("PreferenceDataModule: no tokenizer; call connect(module) before setup() without a Trainer")
        hp = self.hparams
        encoder = PairEncoder(self.tokenizer, hp.max_length, hp.template, hp.mode)
        train = self._load(hp.train) if hp.train else None
        val = self._load(hp.val) if hp.val else None
        if train and not val and hp.val_fraction > 0:
            # by prompt: a prompt's pairs all train or all validate, so held-out figures are not near-train
            keys = [prompt_key(p, m) for p, m in zip(train["prompt"], train["prompt_messages"], strict=True)]
            train_idx, val_idx = split_by_prompt(keys, hp.val_fraction, hp.seed)
            val = train.select(val_idx)
            train = train.select(train_idx)
        if train:
            self.train_set = EncodedPairs(train, encoder, hp.use_strength)
        if val:
            self.val_set = EncodedPairs(val, encoder)
        log.info(
            "pairs: %d train, %d val; %d of %d encoded sequences truncated to %d tokens",
            len(train or []), len(val or []), encoder.n_truncated, encoder.n_encoded, hp.max_length,
        )
        self.n_truncated, self.n_encoded = encoder.n_truncated, encoder.n_encoded

    def _rank_world(self) -> tuple[int, int]:
        """This process's rank and the world size: the Trainer's, else the process group's (Fabric), else 0, 1."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        sampler = None
        if shuffle:
            # The order of epoch e is a permutation seeded by ``seed + e`` alone (a DistributedSampler, which
            # Lightning keeps and gives ``set_epoch`` each epoch, in both engines and on any number of
            # processes): the Trainer, the Fabric engine and a resumed run of either see the same batches in
            # every epoch. A DataLoader's own generator would instead depend on how many times it was iterated.
            sampler = EpochShuffle(dataset, seed=self.hparams.seed, world=self._rank_world)
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            collate_fn=PairCollator(self.tokenizer.pad_token_id),
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise ValueError("data.train: no training file given")
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []

    def finalize_dataloader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Training pairs (both orders), unshuffled, split across ranks without padding or repeats.

        A distributed sampler would pad the last shard with repeated pairs; here each pair is counted exactly
        once over all ranks, so the summed precision equals the single-process one.
        """
        if self.train_set is None:
            raise ValueError("data.train: the covariance pass needs the training pairs")
        shard = Subset(self.train_set, list(range(rank, len(self.train_set), world_size)))
        return self._loader(shard, shuffle=False)
