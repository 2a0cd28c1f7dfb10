"""The global-batch OT coupling over a real 2-process gloo group equals one exact solve on the joined batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fm.couplings import ExactOTCoupling, GlobalOTCoupling


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, x_0, x_1, y, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    b = x_0.shape[0] // world
    sl = slice(rank * b, (rank + 1) * b)
    p_0, p_1, p_y = GlobalOTCoupling()(x_0[sl], x_1[sl], y[sl])
    out[rank] = (p_0, p_1, p_y)
    # the same plan on a gloo group of its own, in a thread, while the main thread all-reduces on the default group
    import threading

    group, ahead = dist.new_group(backend="gloo"), {}
    thread = threading.Thread(target=lambda: ahead.update(pairs=GlobalOTCoupling(group)(x_0[sl], x_1[sl], y[sl])))
    thread.start()
    grads = [torch.full((1000,), float(rank)) for _ in range(20)]
    for grad in grads:
        dist.all_reduce(grad)
    thread.join()
    out[f"ahead{rank}"] = ahead["pairs"]
    out[f"reduced{rank}"] = all(torch.equal(grad, torch.full((1000,), 1.0)) for grad in grads)
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_global_ot_equals_one_solve_on_the_joined_batch():
    world, b = 2, 16
    x_0, x_1 = torch.randn(world * b, 1, 4, 4), torch.randn(world * b, 1, 4, 4) + 0.5
    y = torch.arange(world * b)
    manager = mp.Manager()
    out = manager.dict()
    mp.start_processes(_worker, args=(world, _free_port(), x_0, x_1, y, out), nprocs=world, start_method="spawn")
    joined_1 = torch.cat([out[r][1] for r in range(world)])
    joined_y = torch.cat([out[r][2] for r in range(world)])
    _, ref_1, ref_y = ExactOTCoupling()(x_0, x_1, y)
    torch.testing.assert_close(joined_1, ref_1)
    assert torch.equal(joined_y, ref_y)
    torch.testing.assert_close(torch.cat([out[r][0] for r in range(world)]), x_0)
    # the same plan made in one process (what a CPU worker of the training stream does), split by rank
    parts = GlobalOTCoupling().split(list(x_0.chunk(world)), list(x_1.chunk(world)), list(y.chunk(world)))
    for r in range(world):
        for a, b in zip(parts[r], out[r], strict=True):
            assert torch.equal(a, b)
    for r in range(world):
        assert out[f"reduced{r}"]
        for a, b in zip(out[f"ahead{r}"], out[r], strict=True):
            assert torch.equal(a, b)
