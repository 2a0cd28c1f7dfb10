"""derive_seed: a hash of the whole tuple, so no two tuples of indices share a seed."""

import random

from fm.seeding import derive_seed


def test_the_collisions_of_a_linear_polynomial_are_gone():
    # each pair collided under seed = seed * 1_000_003 + part (the old derive_seed)
    pairs = [((0, 0, 0, 2), (0, 0, 2)),  # rank 0's flips at step 0 and its noise at step 2
             ((0, 0, 7, 1), (0, 7, 1)),  # a training stream's label draws and sample 7's SDE noise
             ((0, 1000004), (0, 1, 1)),  # sample 1,000,004's start noise and sample 1's SDE noise
             ((1, 5), (0, 5 + 1000003)),  # runs with seeds 1 and 0 past a million samples
             ((0,), (0, 0)), ((), (0,))]
    for a, b in pairs:
        assert derive_seed(*a) != derive_seed(*b), (a, b)


def test_order_sign_and_range():
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert derive_seed(-1) != derive_seed(1)
    assert derive_seed(3, 4, 5) == derive_seed(3, 4, 5)
    assert all(0 <= derive_seed(s, i) < 2**63 - 1 for s in (0, 1, 2**40) for i in range(100))


def test_a_million_tuples_give_a_million_seeds():
    rng = random.Random(0)
    tuples = {tuple(rng.randrange(-(2**40), 2**40) if rng.random() < 0.1 else rng.randrange(10**6)
                    for _ in range(rng.randint(1, 4))) for _ in range(1_000_000)}
    # plus every short tuple of small indices, where a polynomial hash collides most
    tuples |= {(s, a, b) for s in range(4) for a in range(100) for b in range(100)}
    tuples |= {(s, a) for s in range(4) for a in range(100_000)}
    seeds = {derive_seed(*t) for t in tuples}
    assert len(seeds) == len(tuples)
