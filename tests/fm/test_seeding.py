"""derive_seed: a hash of the whole tuple, so no two tuples of indices share a seed."""

import random

from fm.seeding import derive_seed


def test_the_collisions_of_a_linear_polynomial_are_gone():
    # each pair collided under seed = seed * 1_000_003 + part (the old derive_seed)
    pairs = [
        ((0, 0, 0, 2), (0, 0, 2)),  # rank 0's flips at step 0 and its noise at step 2
        ((0, 0, 7, 1), (0, 7, 1)),  # a training stream's label draws and sample 7's SDE noise
        ((0, 1000004), (0, 1, 1)),  # sample 1,000,004's start noise and sample 1's SDE noise
        ((1, 5), (0, 5 + 1000003)),  # runs with seeds 1 and 0 past a million samples
        ((0,), (0, 0)),
        ((), (0,)),
    ]
    for a, b in pairs:
        assert derive_seed(*a) != derive_seed(*b), (a, b)


def test_order_sign_and_range():
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert derive_seed(-1) != derive_seed(1)
    assert derive_seed(3, 4, 5) == derive_seed(3, 4, 5)
    assert all(0 <= derive_seed(s, i) < 2**63 - 1 for s in (0, 1, 2**40) for i in range(100))


def test_a_million_tuples_give_a_million_seeds():
    rng = random.Random(0)
    tuples = {
        tuple(
            rng.randrange(-(2**40), 2**40) if rng.random() < 0.1 else rng.randrange(10**6)
            for _ in range(rng.randint(1, 4))
        )
        for _ in range(1_000_000)
    }
    # plus every short tuple of small indices, where a polynomial hash collides most
    tuples |= {(s, a, b) for s in range(4) for a in range(100) for b in range(100)}
    tuples |= {(s, a) for s in range(4) for a in range(100_000)}
    seeds = {derive_seed(*t) for t in tuples}
    assert len(seeds) == len(tuples)


def test_the_generator_uses_the_whole_seed():
    import torch

    from fm.seeding import SeedStack, generator, seeded_generator

    # sample ids 36030 and 37394 of sample.seed=0: their 63-bit seeds agree in the low 32 bits, which is all that
    # torch.Generator.manual_seed keeps on the CPU, so under the old seeding both started from the same noise
    a, b = derive_seed(0, 36030), derive_seed(0, 37394)
    assert a != b and a % 2**32 == b % 2**32
    old = [torch.randn(8, generator=torch.Generator().manual_seed(s)) for s in (a, b)]
    assert torch.equal(*old)
    x = SeedStack([a, b]).randn([1, 8, 8])
    assert not torch.equal(x[0], x[1])
    assert not torch.equal(torch.randn(8, generator=generator(0, 36030)), torch.randn(8, generator=generator(0, 37394)))
    # seeds equal in their low 32 bits, and in their high ones
    for s in (5, 2**40 + 7, 2**62 - 1):
        seeds = {s + k * 2**32 for k in range(4)} | {s ^ (1 << bit) for bit in range(32, 63)}
        draws = {tuple(torch.rand(4, generator=seeded_generator(seed)).tolist()) for seed in seeds}
        assert len(draws) == len(seeds) >= 33
    # the same seed gives the same stream, and the generator records the seed it was given
    g = seeded_generator(2**61 + 3)
    assert g.initial_seed() == 2**61 + 3
    assert torch.equal(torch.randn(5, generator=g), torch.randn(5, generator=seeded_generator(2**61 + 3)))


def test_a_million_sample_ids_start_from_a_million_distinct_noises():
    import torch

    from pipelines.core.samples import sample_noise

    seen, n, chunk = set(), 1_000_000, 20_000
    for start in range(0, n, chunk):
        # the starting noise of each id as the sampler draws it (sample.seed=0); two values each: one float32 value
        # alone repeats by chance (a million draws from about 2^25 likely values)
        x = sample_noise(0, torch.arange(start, start + chunk).numpy(), [2])
        seen.update(map(tuple, x.view(torch.int32).tolist()))
    assert len(seen) == n
