"""dist.py and the run folder's GPU side, tested on the CPU: torchrun's calls recorded with the
distributed and CUDA functions mocked (the two-process gloo runs are in test_train.py)."""
import datetime
from types import SimpleNamespace

import pytest
import torch

import dist
import runfolder


@pytest.fixture
def torchrun(monkeypatch):
    """This process as rank 1 of 2 on a machine with 2 GPUs; every call recorded, none made."""
    calls = {}
    monkeypatch.setattr(dist, "WORLD", 2)
    monkeypatch.setattr(dist, "LOCAL_RANK", 1)
    monkeypatch.setattr(dist, "_GROUP", [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", d))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: "init" in calls)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: calls.setdefault("init", dict(kw, backend=backend)))
    monkeypatch.setattr(torch.distributed, "new_group",
                        lambda **kw: calls.setdefault("group", kw))
    # restored by hand: monkeypatch cannot delete cuBLASModule's property on undo
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield calls
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def test_each_process_is_pinned_to_its_gpu_and_nccl_is_chosen_by_the_device(torchrun):
    device = dist.init(None)
    assert device == torch.device("cuda", 1) and torchrun["set_device"] == device
    init = torchrun["init"]
    assert init["backend"] == "nccl" and init["device_id"] == device
    # stage 1 on rank 0 may take hours: the waits outlast it, on a CPU group
    assert init["timeout"] >= datetime.timedelta(hours=12)
    assert torchrun["group"]["backend"] == "gloo"
    assert torchrun["group"]["timeout"] == init["timeout"]


def test_a_cpu_run_under_torchrun_uses_gloo_whatever_the_machine_has(torchrun):
    device = dist.init("cpu")
    assert device == torch.device("cpu") and "set_device" not in torchrun
    assert torchrun["init"]["backend"] == "gloo" and torchrun["init"]["device_id"] is None


def test_a_numbered_gpu_under_torchrun_is_refused_and_cuda_means_this_processs(torchrun):
    with pytest.raises(ValueError, match="--device cuda:0: under torchrun each process uses its "
                                         "own GPU"):
        dist.init("cuda:0")
    assert "init" not in torchrun  # refused before the process group
    assert dist.init("cuda") == torch.device("cuda", 1)


def test_precision_fp32_turns_tf32_off_in_cublas_and_cudnn(torchrun):
    torch.backends.cudnn.allow_tf32 = True
    dist.init("cuda", "auto")
    assert torch.backends.cudnn.allow_tf32  # auto leaves the defaults
    dist.init("cuda", "fp32")
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_ddp_is_given_the_processs_device(torchrun, monkeypatch):
    made = []
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                        lambda model, **kw: made.append(kw) or model)
    on_gpu = SimpleNamespace(parameters=lambda: iter([SimpleNamespace(
        device=torch.device("cuda", 1))]))
    dist.parallel(on_gpu, find_unused=True)
    dist.parallel(torch.nn.Linear(2, 2), find_unused=False)
    assert made == [dict(device_ids=[torch.device("cuda", 1)], find_unused_parameters=True),
                    dict(device_ids=None, find_unused_parameters=False)]


def test_a_checkpoint_keeps_the_cuda_generators_and_a_resume_restores_them(tmp_path, monkeypatch):
    states = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3, 4], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    state = dict(epoch=1, metrics=[{"epoch": 1}], best={"w": p.detach()})
    runfolder.save_checkpoint(str(tmp_path), state, opt, sched, {"w": p})
    ckpt = runfolder.read_checkpoint(str(tmp_path))
    assert [s.tolist() for s in restored[0]] == [[1, 2], [3, 4]]
    assert ckpt["state"]["epoch"] == 1 and ckpt["trainable"]["w"].device.type == "cpu"
