"""Small builders shared by the tests."""

import dataclasses

import torch

from pyro_mm.models.params import GaussianExpertParams, MoEParams


def random_gaussian_params(num_experts, gate_dim, out_features, expert_dim, generator, scale=1.0):
    """Random (non-fitted) parameters of a Gaussian MoE, float64."""
    return MoEParams(
        gate=scale
        * torch.randn(num_experts - 1, gate_dim, generator=generator, dtype=torch.float64),
        experts=GaussianExpertParams(
            weight=torch.randn(
                num_experts, out_features, expert_dim, generator=generator, dtype=torch.float64
            ),
            variance=0.2
            + torch.rand(num_experts, out_features, generator=generator, dtype=torch.float64),
        ),
    )


def assert_trees_identical(left, right, where="state"):
    """Bitwise equality of nested dicts/lists/dataclasses of tensors and plain values."""
    if dataclasses.is_dataclass(left):
        assert type(left) is type(right), where
        for field in dataclasses.fields(left):
            assert_trees_identical(
                getattr(left, field.name), getattr(right, field.name), f"{where}.{field.name}"
            )
    elif isinstance(left, dict):
        assert isinstance(right, dict) and left.keys() == right.keys(), where
        for key in left:
            assert_trees_identical(left[key], right[key], f"{where}[{key!r}]")
    elif isinstance(left, list):
        assert isinstance(right, list) and len(left) == len(right), where
        for index, (a, b) in enumerate(zip(left, right)):
            assert_trees_identical(a, b, f"{where}[{index}]")
    elif isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor) and left.dtype == right.dtype, where
        assert torch.equal(left, right), where
    else:
        assert left == right, where


def init_local_gloo(rank: int, store_path: str, world_size: int) -> None:
    """Joins a gloo process group of ``world_size`` ranks on localhost (in a spawned worker),
    with one torch thread per rank (the ranks share the machine's cores).

    The ranks meet through a file store at ``store_path`` (a path in the test's temporary
    folder that does not exist yet): a TCP rendezvous on a port found free beforehand can lose
    the port to another process before rank 0 binds it."""
    import datetime
    import os

    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
