"""Seeds derived from a run seed and indices, and a stack of per-sample generators (after EDM's
`StackedRandomGenerator`).

Every random draw of training, sampling and evaluation comes from a generator seeded by `derive_seed(run seed,
index, ...)`, so results do not depend on batch size, worker or actor count, or restarts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["derive_seed", "generator", "draw_device", "SeedStack"]

_MOD = 2**63 - 1  # torch.Generator.manual_seed takes any int64; keep seeds positive
_PART_BYTES = 16  # every part as a signed 128-bit integer: indices and run seeds far beyond any real count


def derive_seed(*parts: int) -> int:
    """A seed in [0, 2^63 - 1) from a run seed and indices, e.g. (seed, rank, step) or (seed, sample id).

    The parts are hashed as a tuple (BLAKE2b over the count and fixed-width encodings of the parts), so order and
    length matter and no two tuples are related: (0, 0, 0, 2) and (0, 0, 2), or (1, i) and (0, i + 1000003), give
    independent seeds, which a polynomial of the parts does not (it collides on such tuples).
    """
    h = hashlib.blake2b(len(parts).to_bytes(2, "little"), digest_size=8, person=b"flowray-seed")
    for part in parts:
        h.update(int(part).to_bytes(_PART_BYTES, "little", signed=True))
    return int.from_bytes(h.digest(), "little") % _MOD


def generator(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on `device` seeded with `derive_seed(*parts)`."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g


def draw_device(generator: torch.Generator | None, device: torch.device | str) -> torch.device:
    """Where a draw for data on `device` is made: on the generator's own device, then moved. A step paired on a CPU
    worker (`pipelines.train.stream`) hands its CPU generator to a trainer on any device, and the loss continues
    from it."""
    return torch.device(device) if generator is None else generator.device


class SeedStack:
    """One generator per sample: row k of every draw comes from seed `seeds[k]` alone.

    Draws are made on the CPU (bit-identical on any device) and moved to `device`. Successive calls advance every
    generator, so a sampler that draws noise at each step gives sample k the same noise in any batch.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = []
        for s in seeds:
            g = torch.Generator()
            g.manual_seed(int(s) % _MOD)
            self.generators.append(g)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normal draws [len(seeds), *shape]."""
        return torch.stack([torch.randn(tuple(shape), generator=g, dtype=dtype) for g in self.generators]).to(
            self.device)

    def randint(self, low: int, high: int, shape: Sequence[int]) -> Tensor:
        """Integer draws in [low, high) [len(seeds), *shape] (int64)."""
        return torch.stack([torch.randint(low, high, tuple(shape), generator=g) for g in self.generators]).to(
            self.device)

    def rand(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """Uniform [0, 1) draws [len(seeds), *shape]."""
        return torch.stack([torch.rand(tuple(shape), generator=g, dtype=dtype) for g in self.generators]).to(
            self.device)
