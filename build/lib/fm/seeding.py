"""Seeds derived from a run seed and indices, and a stack of per-sample generators (after EDM's
`StackedRandomGenerator`).

Every random draw of training, sampling and evaluation comes from a generator seeded by `derive_seed(run seed,
index, ...)`, so results do not depend on batch size, worker or actor count, or restarts.

The generator uses the whole 63-bit seed. `torch.Generator.manual_seed` on the CPU keeps only its low 32 bits (the
Mersenne Twister's seeding takes one 32-bit word), so 63-bit hashes fed to it collide by the birthday bound: about
one pair of sample ids in 50k start from the same noise, a hundred pairs in a million. `seeded_generator` instead
fills the Twister's whole state (624 words) from the 64-bit seed with SplitMix64, the expander its authors and
Vigna's xoshiro seeding use, so distinct seeds give distinct streams. Outputs written under the old seeding carry
no `seeding` version (or version 1) and are refused where they would be mixed with new ones (`SEEDING_VERSION`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SEEDING_VERSION",
    "derive_seed",
    "seeded_generator",
    "generator",
    "seed_default_generator",
    "draw_device",
    "SeedStack",
]

SEEDING_VERSION = 2  # 1: manual_seed (the low 32 bits of each seed); 2: the whole seed (`seeded_generator`)
_MOD = 2**63 - 1  # keep seeds positive int64
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


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_STEPS = np.arange(1, 625, dtype=np.uint64) * _GOLDEN  # SplitMix64's counter for the Twister's 624 state words
_STATE_AT, _WORDS = 24, 624  # CPUGeneratorImplState: seed (u64), left, seeded (i32), next (u64), state[624] (u64)


def _cpu_template() -> Tensor:
    g = torch.Generator()
    g.manual_seed(0)
    state = g.get_state()
    if state.numel() < _STATE_AT + 8 * _WORDS:  # a layout this module was not written for: fail, never go narrow
        raise RuntimeError(f"torch {torch.__version__}: unexpected CPU generator state of {state.numel()} bytes")
    return state


_TEMPLATE = _cpu_template()


def _twister_states(seeds: Sequence[int]) -> np.ndarray:
    """CPU generator states [len(seeds), state bytes] uint8: row k's 624 Mersenne Twister words are the first 624
    outputs of SplitMix64(seeds[k]) (high 32 bits of each), its recorded initial seed is seeds[k], and it holds no
    cached normal draw. Vectorised over the seeds: a stack of a thousand costs about what one costs."""
    s = np.asarray([int(x) % _MOD for x in seeds], dtype=np.uint64)[:, None]
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as SplitMix64 means it to
        z = _STEPS[None, :] + s
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        words = (z ^ (z >> np.uint64(31))) >> np.uint64(32)
    out = np.tile(_TEMPLATE.numpy(), (len(s), 1))
    head = np.empty((len(s), 3), dtype=np.uint64)  # seed; left = 1, seeded = 1 (two int32); next = 0
    head[:, 0], head[:, 1], head[:, 2] = s[:, 0], 1 | (1 << 32), 0
    out[:, :_STATE_AT] = head.view(np.uint8)
    out[:, _STATE_AT : _STATE_AT + 8 * _WORDS] = words.view(np.uint8)
    return out


def _generator_from(state: np.ndarray) -> torch.Generator:
    g = torch.Generator()
    g.set_state(torch.from_numpy(state.copy()))  # a tensor of its own: set_state reads a view's base, not the view
    return g


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on `device` whose stream depends on all 63 bits of `seed` (CUDA's Philox takes the whole
    seed itself; the CPU Twister gets its state from `_twister_state`)."""
    if torch.device(device).type == "cpu":
        return _generator_from(_twister_states([seed])[0])
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) % _MOD)
    return g


def generator(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on `device` seeded with `derive_seed(*parts)` (all of it: `seeded_generator`)."""
    return seeded_generator(derive_seed(*parts), device)


def seed_default_generator(seed: int) -> None:
    """Seed torch's global generators (what dropout draws from) with all of `seed`, on the CPU and every GPU."""
    torch.default_generator.set_state(torch.from_numpy(_twister_states([seed])[0].copy()))
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(int(seed) % _MOD)


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
        self.generators = [_generator_from(state) for state in _twister_states(seeds)]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normal draws [len(seeds), *shape]."""
        return torch.stack([torch.randn(tuple(shape), generator=g, dtype=dtype) for g in self.generators]).to(
            self.device
        )

    def randint(self, low: int, high: int, shape: Sequence[int]) -> Tensor:
        """Integer draws in [low, high) [len(seeds), *shape] (int64)."""
        return torch.stack([torch.randint(low, high, tuple(shape), generator=g) for g in self.generators]).to(
            self.device
        )

    def rand(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """Uniform [0, 1) draws [len(seeds), *shape]."""
        return torch.stack([torch.rand(tuple(shape), generator=g, dtype=dtype) for g in self.generators]).to(
            self.device
        )
