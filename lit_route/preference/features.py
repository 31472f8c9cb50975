"""An on-disk cache of what a frozen backbone computes, so heads train for many epochs at the cost of one.

When nothing below the head trains (``freeze_backbone`` without LoRA), the pooled feature of a sequence is a
fixed function of its token ids; with LoRA on the top layers only, so are the hidden states entering the lowest
adapted layer (see :mod:`lit_route.models.split`). :class:`FeatureCache` stores either once, keyed by

- the model: a fingerprint of the frozen weights, their dtype, what is cached (pooled features, or the
  inputs of layer k) and the model's description (path, GGUF file, revision, package version), so features of
  another model are never served;
- the sequence: a hash of its exact token ids, which covers the data, the pair template, the order of the two
  responses and truncation, so any change of encoding or data is a miss, never a stale hit.

Features are appended to the cache folder in shard files as they are computed (a killed run keeps what it
computed), and every later epoch, head, ensemble member, validation pass, covariance pass and ``score_pairs``
call that meets the same sequences reads them instead of running the backbone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def sequence_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[bytes]:
    """One 16-byte key per row: a BLAKE2b hash of the row's real (unmasked) token ids. (N, L) -> N keys."""
    ids = input_ids.detach().cpu().long()
    mask = attention_mask.detach().cpu().bool()
    return [hashlib.blake2b(ids[i][mask[i]].numpy().tobytes(), digest_size=16).digest() for i in range(ids.shape[0])]


def weights_fingerprint(module: torch.nn.Module, max_elements: int = 1 << 20) -> str:
    """A hash of every frozen parameter and every buffer (name, shape, dtype and values; tensors longer than
    ``max_elements`` are hashed on an even sample of that many values, enough to see any retraining).
    Trainable parameters (adapters) are left out: they change every step and are never below the cached part."""
    digest = hashlib.blake2b(digest_size=16)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    state = {k: v for k, v in module.state_dict(keep_vars=True).items() if k not in trainable}
    for name, tensor in sorted(state.items()):
        flat = tensor.detach().reshape(-1)
        if flat.numel() > max_elements:
            flat = flat[:: flat.numel() // max_elements + 1]
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat.cpu().float().numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Per-sequence tensors of a frozen backbone (pooled features (H,), or hidden states (L, H)), on disk and in
    memory, keyed by model and token ids. Everything is kept in memory once read: hidden states of a few
    thousand sequences of a few hundred tokens take a few GB (pooled features: a few MB).

    Args:
        directory: Cache folder (one subfolder per model key).
        flush_every: Write a shard once this many new features are pending.
    """

    def __init__(self, directory: str | os.PathLike, flush_every: int = 256):
        self.directory = Path(directory)
        self.flush_every = flush_every
        self.model_key: str | None = None
        self._index: dict[bytes, int] = {}
        self._rows: list[torch.Tensor] = []
        self._pending: list[tuple[bytes, torch.Tensor]] = []
        self.hits = 0
        self.misses = 0

    # --- binding to a model ------------------------------------------------------------------------------
    def bind(self, model_key: str, description: dict | None = None) -> None:
        """Selects (and loads) the features of one model; a no-op when already bound to it."""
        if model_key == self.model_key:
            return
        self.flush()
        self.model_key = model_key
        self._index, self._rows, self._pending = {}, [], []
        folder = self.folder
        folder.mkdir(parents=True, exist_ok=True)
        meta = folder / "model.json"
        if description is not None and not meta.exists():
            meta.write_text(json.dumps({"format": FORMAT_VERSION, **description}, indent=2, default=str))
        for shard in sorted(folder.glob("shard-*.pt")):
            try:
                data = torch.load(shard, map_location="cpu", weights_only=True)
            except Exception as err:  # a shard cut short by a killed run: skip it, its rows are recomputed
                log.warning("feature cache: ignoring unreadable shard %s (%s)", shard, err)
                continue
            # pooled-only shards hold one (n, H) table; general ones a flat (Σl, H) table and the row lengths
            rows = data["features"] if "features" in data else torch.split(data["flat"], data["lengths"].tolist())
            self._add_rows([bytes(k) for k in data["keys"].numpy()], rows)
        if self._index:
            log.info("feature cache: %d features of model %s loaded from %s", len(self._index), model_key[:12], folder)

    @property
    def folder(self) -> Path:
        if self.model_key is None:
            raise RuntimeError("feature cache is not bound to a model")
        return self.directory / self.model_key

    def __len__(self) -> int:
        return len(self._index)

    # --- lookups -------------------------------------------------------------------------------------------
    def _add_rows(self, keys: list[bytes], rows) -> None:
        """Stores each row as a 2-D (l, H) tensor (a pooled feature is l = 1)."""
        for key, row in zip(keys, rows, strict=True):
            if key not in self._index:
                self._index[key] = len(self._rows)
                self._rows.append(row.detach().float().cpu().reshape(-1, row.shape[-1]))

    def _lookup(self, input_ids, attention_mask, compute) -> list[torch.Tensor]:
        keys = sequence_keys(input_ids, attention_mask)
        missing = [i for i, k in enumerate(keys) if k not in self._index]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            idx = torch.tensor(missing, device=input_ids.device)
            ids, mask = input_ids[idx], attention_mask[idx]
            used = mask.bool().any(0).nonzero()
            lo, hi = int(used.min()), int(used.max()) + 1  # drop columns that are padding in every missing row
            with torch.no_grad():
                computed = compute(ids[:, lo:hi], mask[:, lo:hi])
            new_keys = [keys[i] for i in missing]
            self._add_rows(new_keys, computed)
            self._pending.extend((k, self._rows[self._index[k]]) for k in new_keys)
            if len(self._pending) >= self.flush_every:
                self.flush()
        return [self._rows[self._index[k]] for k in keys]

    def get_or_compute(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Pooled features (N, H) of a batch: cached rows are read, the others computed by ``compute`` on the
        missing rows only (trimmed to their own width) and stored.

        Args:
            input_ids: (N, L), right- or left-padded.
            attention_mask: (N, L).
            compute: ``(ids, mask) -> (n, H)``: the frozen backbone and pooling.

        Returns:
            (N, H) float32 on the device of ``input_ids``.
        """
        return torch.cat(self._lookup(input_ids, attention_mask, compute)).to(input_ids.device)

    def get_or_compute_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Hidden states (N, L, H) of a right-padded batch, zero at padding; only real tokens are stored.

        Args:
            input_ids: (N, L), right-padded.
            attention_mask: (N, L).
            compute: ``(ids, mask) -> (n, l, H)``: the frozen bottom layers.
        """
        lengths = attention_mask.long().sum(1).tolist()

        def real_tokens(ids, mask):
            hidden = compute(ids, mask)
            return [hidden[i, : int(n)] for i, n in enumerate(mask.long().sum(1).tolist())]

        rows = self._lookup(input_ids, attention_mask, real_tokens)
        out = torch.zeros(len(rows), input_ids.shape[1], rows[0].shape[-1])
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            out[i, :n] = row
        return out.to(input_ids.device)

    def flush(self) -> None:
        """Writes the pending features as one new shard (atomic rename: a reader never sees half a file)."""
        if not self._pending or self.model_key is None:
            return
        keys = torch.tensor([list(k) for k, _ in self._pending], dtype=torch.uint8)
        lengths = torch.tensor([row.shape[0] for _, row in self._pending])
        flat = torch.cat([row for _, row in self._pending])
        name = f"shard-{uuid.uuid4().hex}.pt"
        tmp = self.folder / f".{name}.tmp"
        torch.save({"keys": keys, "lengths": lengths, "flat": flat}, tmp)
        tmp.replace(self.folder / name)
        self._pending = []

    def stats(self) -> dict[str, int]:
        return {"cached": len(self._index), "hits": self.hits, "misses": self.misses}


def length_batches(lengths: list[int], max_rows: int = 64, max_tokens: int = 16384) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first, so that padding is small.

    Each batch holds at most ``max_rows`` rows and at most ``max_tokens`` padded tokens (rows × its longest
    sequence; a single longer sequence gets a batch of its own). Longest first: the largest batch comes first,
    and an estimate of the remaining time errs long, never short.

    Args:
        lengths: Tokens of each sequence, (N,).
        max_rows: Rows per batch.
        max_tokens: Padded tokens per batch.

    Returns:
        Batches of indices into ``lengths``; every index appears once.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < max_rows and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)  # sorted longest first: the batch's first row sets its width
        else:
            batches.append([i])
    return batches


def padded_tokens(lengths: list[int], batches: list[list[int]]) -> int:
    """Tokens a backbone reads for ``batches`` of right-padded sequences: Σ rows × longest row."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def token_key(ids: list[int]) -> bytes:
    """The cache key of one unpadded sequence (the same as :func:`sequence_keys` gives its row)."""
    return hashlib.blake2b(torch.tensor(ids, dtype=torch.long).numpy().tobytes(), digest_size=16).digest()


@torch.no_grad()
def fill_feature_cache(module, sequences: list[list[int]], pad_id: int, max_rows: int = 64,
                       max_tokens: int = 16384, progress: bool = True) -> dict[str, int]:
    """Computes the pooled features of every sequence not yet in ``module.feature_cache``, in length order.

    Training batches are shuffled, so in the first epoch every sequence is padded to the longest of its batch;
    read in length order instead, the backbone reads little more than the real tokens. The progress bar counts
    tokens (the backbone's cost grows with them) and shows sequences done, the rate and the remaining time.

    Args:
        module: A ``PreferenceModule`` with a feature cache and a frozen backbone.
        sequences: Token ids of each sequence (unpadded); duplicates and cached ones are skipped.
        pad_id: The tokenizer's padding id.
        max_rows: Rows per forward pass.
        max_tokens: Padded tokens per forward pass.
        progress: Show the progress bar.

    Returns:
        ``sequences`` (asked for), ``computed``, ``tokens`` (real) and ``padded_tokens`` (read by the backbone).
    """
    from tqdm.auto import tqdm

    from lit_route.data.encoding import pad_batch

    module._bind_cache("pooled")
    cache = module.feature_cache
    todo: dict[bytes, list[int]] = {}
    for ids in sequences:
        key = token_key(ids)
        if key not in cache._index and key not in todo:
            todo[key] = list(ids)
    missing = list(todo.values())
    lengths = [len(s) for s in missing]
    batches = length_batches(lengths, max_rows, max_tokens)
    total = padded_tokens(lengths, batches) if batches else 0
    summary = {"sequences": len(sequences), "computed": len(missing), "tokens": sum(lengths), "padded_tokens": total}
    if not missing:
        return summary
    log.info("feature pass: %d of %d sequences not cached: %d tokens in length order", len(missing),
             len(sequences), total)
    device = next(module.parameters()).device
    bar = tqdm(total=total, desc="feature pass", unit="tok", unit_scale=True, disable=not progress,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} tok{postfix} [{elapsed}<{remaining}, {rate_fmt}]")
    done = 0
    try:
        for batch in batches:
            padded = pad_batch([missing[i] for i in batch], pad_id)
            module.pooled(padded["input_ids"].to(device), padded["attention_mask"].to(device))
            done += len(batch)
            bar.set_postfix_str(f"{done}/{len(missing)} sequences", refresh=False)
            bar.update(len(batch) * max(lengths[i] for i in batch))
    finally:  # an interrupted pass keeps everything it computed for the next run
        bar.close()
        cache.flush()
    return summary
