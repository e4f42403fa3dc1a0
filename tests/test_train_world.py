"""Per-rank devices under torchrun (issue 13.3), without a GPU: torch.cuda and torch.distributed are
monkeypatched, so these check the mapping LOCAL_RANK -> cuda:LOCAL_RANK, its error, the backend
init_world picks and the device the DAPO World builds its collective tensors on. The real
multi-process run (2 gloo ranks) is tests/test_dapo.py::test_two_processes_give_the_same_update_as_one."""

import datetime

import pytest
import torch

from gr2.errors import ConfigError
from gr2.train.devices import local_device
from gr2.train.dapo import World, init_world


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two visible "GPUs"; returns the list of set_device calls."""
    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(int(d)))
    return calls


def test_local_rank_picks_its_own_gpu(fake_cuda, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_device("auto") == torch.device("cuda", 1)
    assert local_device("cuda") == torch.device("cuda", 1)
    assert fake_cuda == [1, 1]
    assert local_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    assert local_device("cpu") == torch.device("cpu")
    assert fake_cuda == [1, 1]


def test_an_explicit_gpu_shared_by_the_ranks_of_a_node_is_a_config_error(fake_cuda, monkeypatch):
    """device = "cuda:0" in the config under torchrun --nproc_per_node 2: every rank would train on
    GPU 0 (issue 29). Its own index is fine, and so is cuda:0 when each rank sees one GPU."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match=r"'cuda:0'.*LOCAL_RANK=1 of 2.*share one GPU"):
        local_device("cuda:0")
    assert local_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA_VISIBLE_DEVICES gives each rank one GPU
    assert local_device("cuda:0") == torch.device("cuda", 0)


def test_without_torchrun_the_device_is_plain(fake_cuda, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert local_device("auto") == torch.device("cuda")
    assert fake_cuda == []


def test_local_rank_beyond_the_visible_gpus_is_a_config_error(fake_cuda, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError, match=r"LOCAL_RANK = 2 .*only 2 CUDA device"):
        local_device("auto")
    assert fake_cuda == []


def test_world_builds_its_collective_tensors_on_its_device(monkeypatch):
    made: list[tuple[torch.device, torch.dtype]] = []
    real_tensor = torch.tensor

    def spy(data, *, dtype=None, device=None):  # record where the world asked for it; build it on the CPU
        made.append((torch.device(device), dtype))
        return real_tensor(data, dtype=dtype)

    reduced: list[torch.Tensor] = []

    def all_reduce(t):  # two ranks holding the same value
        reduced.append(t)
        t.mul_(2)

    monkeypatch.setattr(torch, "tensor", spy)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    world = World(rank=1, size=2, device=torch.device("cuda", 1))
    assert world.all_sum(3.0) == 6.0
    assert made == [(torch.device("cuda", 1), torch.float64)] and len(reduced) == 1
    made.clear()
    assert World().all_sum(3.0) == 3.0 and made == []  # one process: no collective, no tensor


@pytest.mark.parametrize("cuda", [True, False])
def test_init_world_picks_backend_and_device(fake_cuda, monkeypatch, cuda):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    backends: list[str] = []
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(backends))
    timeouts = []

    def init_process_group(backend, timeout=None):
        backends.append(backend)
        timeouts.append(timeout)

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(dist, "get_backend", lambda: backends[-1])
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    world = init_world(None if cuda else torch.device("cpu"))
    assert (world.rank, world.size) == (1, 2)
    if cuda:  # default: this rank's GPU, nccl, collectives on that GPU
        assert backends == ["nccl"] and world.device == torch.device("cuda", 1) and fake_cuda == [1]
    else:  # a CPU run on a GPU machine still uses gloo, on the CPU
        assert backends == ["gloo"] and world.device == torch.device("cpu") and fake_cuda == []
    # a timeout long enough for rank 0 to save a large model while the others wait (issue 29)
    assert timeouts == [datetime.timedelta(minutes=120)]


def test_dist_timeout_is_configurable_and_checked(monkeypatch):
    from gr2.errors import ConfigError
    from gr2.train.distributed import dist_timeout

    monkeypatch.setenv("GR2_DIST_TIMEOUT_MIN", "7.5")
    assert dist_timeout() == datetime.timedelta(minutes=7.5)
    for bad in ("soon", "0", "inf"):
        monkeypatch.setenv("GR2_DIST_TIMEOUT_MIN", bad)
        with pytest.raises(ConfigError, match="GR2_DIST_TIMEOUT_MIN"):
            dist_timeout()


def test_checkpoint_state_is_loaded_onto_the_cpu(tmp_path, monkeypatch):
    """Every rank loads the optimizer state onto the CPU, not onto the GPU rank 0 saved it from."""
    from gr2.train.checkpointing import load_checkpoint, save_checkpoint
    from gr2.train.optim import make_optimizer

    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer(model, 1e-2)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "ck", model, optimizer, None, 1, key="k")
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_checkpoint(path, model, optimizer, None)
    assert seen == ["cpu"]


def test_trainer_refuses_a_device_other_than_the_nccl_groups():
    import _dapo_fixtures as fx
    from gr2.train.dapo import DapoTrainer

    model, tokenizer, sid_tokens = fx.tiny_policy()
    data, sids = fx.tiny_data(tokenizer)
    world = World(rank=1, size=2, device=torch.device("cuda", 1))
    with pytest.raises(ConfigError, match="cuda:1"):
        DapoTrainer(model, tokenizer, data, fx.small_config(), sid_tokens=sid_tokens, candidate_sids=sids, world=world,
                    device=torch.device("cpu"))


def test_gradients_are_summed_in_buckets_equal_to_per_parameter(monkeypatch):
    """World.sum_gradients flattens the gradients into ~bucket_bytes buckets and reduces each with
    one collective (issue 29: one all_reduce per parameter before); the result equals summing each
    parameter's gradient (the collective faked as x -> 3x, three ranks holding the same gradient)."""
    calls: list[int] = []

    def fake_all_reduce(t):
        calls.append(t.numel())
        t.mul_(3)

    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 20), torch.nn.Linear(20, 2))
    model[1].weight.requires_grad_(False)
    model(torch.randn(5, 40)).sum().backward()
    want = {n: 3 * p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    World(rank=0, size=3).sum_gradients(model, bucket_bytes=4 * 1300)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, want[n]), n
        else:
            assert p.grad is None
    assert sum(calls) == sum(t.numel() for t in want.values())
    assert len(calls) < len(want)  # fewer collectives than parameters
