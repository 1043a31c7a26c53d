import torch
from torch import nn

from dskd.pipeline.train import distributed as dist


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    env = dist.init_distributed("cpu")
    assert env.world_size == 1 and env.is_main and not env.distributed
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object(3) == 3
    m = nn.Linear(2, 2)
    assert dist.wrap_ddp(m, env) is m and dist.unwrap(m) is m
    dist.reshard(m)
    dist.barrier()


def test_auto_device_is_cpu_without_cuda():
    if not torch.cuda.is_available():
        assert dist.pick_device("auto").type == "cpu"
