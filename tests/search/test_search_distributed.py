"""gloo all-reduce over 2 CPU processes gives the one-process Hessian (to 1e-10); owners balance cols^2."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from brainsurgeon.calib import capture_hessians
from brainsurgeon.search.distributed import all_reduce_hessians, assign_owners


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=2), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 5)).eval()


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 6, 6, generator=g) for n in (5, 3, 7, 2, 4)]  # unequal sizes


NAMES = ["0", "2", "4"]


def _rank(rank, world, init, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        net = model()
        mine = batches()[rank::world]  # rank 0: batches 0, 2, 4; rank 1: batches 1, 3
        with torch.no_grad(), capture_hessians(net, NAMES) as accs:
            for x in mine:
                net(x)
        H = all_reduce_hessians(accs)
        torch.save(H, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_hessian_equals_single_process(tmp_path):
    out = str(tmp_path / "H")
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'store'}", out), nprocs=2, join=True)
    net = model()
    with torch.no_grad(), capture_hessians(net, NAMES) as accs:
        for x in batches():
            net(x)
    for rank in range(2):
        H = torch.load(f"{out}.{rank}", weights_only=True)
        for n in NAMES:
            ref = accs[n].H
            assert H[n].shape == ref.shape and H[n].dtype == torch.float64
            assert (H[n] - ref).abs().max().item() <= 1e-10 * max(1.0, ref.abs().max().item())


def test_owner_assignment_balances_cols_squared():
    owners = assign_owners({"a": 512, "b": 64, "c": 500, "d": 300, "e": 300}, 2)
    load = [sum(c**2 for n, c in {"a": 512, "b": 64, "c": 500, "d": 300, "e": 300}.items() if owners[n] == r)
            for r in range(2)]
    assert owners["a"] != owners["c"] and max(load) / min(load) < 1.3
    assert assign_owners({"x": 8}, 4) == {"x": 0}
