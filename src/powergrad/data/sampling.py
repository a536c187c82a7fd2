"""Which examples each process sees, and in what order: one rule for every loader.

Train: a permutation seeded by (seed, epoch), identical on all ranks, cut into global batches;
rank r takes the contiguous slice r*b:(r+1)*b of each. So one process with batch B and two with
B/2 each see exactly the same global batches. Eval: rank r takes indices r::world_size.
"""

from __future__ import annotations

import torch

from ..config import Config
from ..errors import UserError

# Large odd multipliers keep the (seed, epoch, step) streams apart.
_EPOCH_MULT = 1_000_003
_MASK = (1 << 63) - 1


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * _EPOCH_MULT + epoch) & _MASK


def step_seed(seed: int, epoch: int, step: int) -> int:
    """Seed for a global batch's augmentation draws: the same for every world size."""
    return (epoch_seed(seed, epoch) * _EPOCH_MULT + step + 0x5EED) & _MASK


def per_rank_batch(batch_size: int, world_size: int) -> int:
    if batch_size % world_size:
        raise UserError(
            f"batch_size ({batch_size}) is the global batch and must be divisible by the "
            f"number of processes ({world_size})"
        )
    return batch_size // world_size


def global_batches(
    n: int, batch_size: int, seed: int, epoch: int, world_size: int
) -> list[torch.Tensor]:
    """The epoch's global batches of indices into 0..n-1 (last partial batch dropped).

    A train set smaller than one global batch gives one smaller batch, trimmed to a multiple of
    world_size so every rank gets the same number of examples.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
    if n < batch_size:
        keep = n - n % world_size
        if keep == 0:
            raise UserError(
                f"the training set ({n} examples) is smaller than the {world_size} processes"
            )
        return [perm[:keep]]
    return list(perm[: n - n % batch_size].view(-1, batch_size))


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, n // batch_size)


def rank_slice(global_len: int, rank: int, world_size: int) -> slice:
    b = global_len // world_size
    return slice(rank * b, (rank + 1) * b)


def eval_indices(n: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of an eval split: every example once over all ranks, no padding."""
    return torch.arange(rank, n, world_size)


def _balanced_order(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A seeded permutation reordered round-robin over classes, so any prefix is class-balanced."""
    perm = torch.randperm(len(labels), generator=gen)
    lab = labels[perm]
    # Occurrence number of each element within its class, in permutation order.
    occ = torch.empty(len(lab), dtype=torch.long)
    for c in lab.unique():
        m = lab == c
        occ[m] = torch.arange(int(m.sum()))
    return perm[torch.sort(occ, stable=True).indices]


def subset_test(labels: torch.Tensor, cfg: Config) -> torch.Tensor | None:
    """Indices of the test split to evaluate on: a class-balanced ``test_subset`` drawn with
    ``cfg.seed`` (as train_subset is), or None for all of it."""
    if cfg.test_subset is None:
        return None
    if not 0 < cfg.test_subset <= len(labels):
        raise UserError(
            f"test_subset={cfg.test_subset}: must be between 1 and the {len(labels)} test examples"
        )
    order = _balanced_order(labels, torch.Generator().manual_seed(epoch_seed(cfg.seed, -3)))
    return order[: cfg.test_subset].sort().values


def split_train(labels: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(train indices, val indices or None) into the training split, per val_fraction and train_subset.

    The val split is carved first, from the full train split, so it stays the same whatever
    train_subset is; the subset is then drawn from what remains. Both are class-balanced.
    """
    n = len(labels)
    idx = torch.arange(n)
    val = None
    if cfg.val_fraction > 0:
        n_val = max(1, round(n * cfg.val_fraction))
        if n_val >= n:
            raise UserError(
                f"val_fraction={cfg.val_fraction} leaves no training examples out of {n}"
            )
        order = _balanced_order(labels, torch.Generator().manual_seed(epoch_seed(cfg.seed, -1)))
        val, idx = order[:n_val].sort().values, order[n_val:].sort().values
    if cfg.train_subset is not None:
        if not 0 < cfg.train_subset <= len(idx):
            raise UserError(
                f"train_subset={cfg.train_subset}: must be between 1 and the {len(idx)} training examples"
            )
        order = _balanced_order(
            labels[idx], torch.Generator().manual_seed(epoch_seed(cfg.seed, -2))
        )
        idx = idx[order[: cfg.train_subset].sort().values]
    return idx, val
