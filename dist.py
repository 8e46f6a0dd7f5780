"""
Where a run runs: its device, the precision the backbone runs in there, and the processes that
torchrun starts (one per GPU, data parallel). Every question of rank, world size and device is
answered here, once.

    device = dist.init(args.device, args.precision)   # pinned, the process group made
    with dist.autocast(device, args.precision):       # bf16 on a GPU that has it, else nothing
        h = backbone(wave)
"""
import contextlib
import datetime
import os

import torch

RANK = int(os.environ.get("RANK", 0))  # this process among torchrun's
WORLD = int(os.environ.get("WORLD_SIZE", 1))  # processes
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))  # this process's GPU on its machine
# rank 0 fills the caches (data, tiny, stage 1) while the others wait: far longer than NCCL's
# default 10 minutes on a whole subject, so the wait is on a CPU (gloo) group with a long timeout
WAIT = datetime.timedelta(hours=24)
_GROUP = []  # the gloo group that the waits and broadcasts use


def choose_device(name=None):
    """--device, or this process's GPU (cuda:LOCAL_RANK) where there is one, else the CPU. Under
    torchrun a CUDA run uses each process's own GPU, so a numbered --device is refused."""
    if name is None:
        name = f"cuda:{LOCAL_RANK}" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and WORLD > 1:
        if device.index not in (None, LOCAL_RANK):
            raise ValueError(f"--device {name}: under torchrun each process uses its own GPU "
                             "(cuda:LOCAL_RANK); give --device cuda or leave it out")
        device = torch.device("cuda", LOCAL_RANK)
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def init(name=None, precision="auto"):
    """The run's device (choose_device), made current, its float32 made exact where --precision
    fp32 asks for it; under torchrun, the process group: NCCL for a CUDA run and gloo for a CPU
    one, chosen by the device this run uses, each process pinned to its GPU (device_id)."""
    device = choose_device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and the allocator use this process's own GPU
        if precision == "fp32":  # TF32 rounds float32 to a 10-bit mantissa; cuDNN uses it too
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
    if WORLD > 1 and not torch.distributed.is_initialized():
        cuda = device.type == "cuda"
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=WAIT,
                                             device_id=device if cuda else None)
    if WORLD > 1 and not _GROUP:
        _GROUP.append(torch.distributed.new_group(backend="gloo", timeout=WAIT))
    return device


def wait():
    """Every process waits here until all have come (a CPU barrier: it may be long); a process
    that ended instead (a refusal, said by rank 0) ends the others at the barrier, in one line."""
    if WORLD > 1:
        try:
            torch.distributed.barrier(group=_GROUP[0])
        except RuntimeError:  # gloo: the connection to a process that has ended
            raise ValueError("another process of this run has ended (see its error)") from None


def end():
    """The process group ended, as the run ends or is refused: a process that exits with it alive
    may abort in gloo's threads ("terminate called without an active exception")."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _GROUP.clear()


def agree(check):
    """check() in every process; a refusal (ValueError) in any of them is raised in all, so that
    every process ends and rank 0 says it once (guard.main_guard). Returns check()'s value."""
    try:
        value, refusal = check(), None
    except ValueError as e:
        value, refusal = None, str(e)
    if WORLD > 1:
        said = [None] * WORLD
        torch.distributed.all_gather_object(said, refusal, group=_GROUP[0])
        refusal = next((s for s in said if s), None)
    if refusal:
        raise ValueError(refusal)
    return value


def first_process_value(value):
    """Rank 0's `value` (any picklable object), in every process."""
    if WORLD == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0, group=_GROUP[0])
    return box[0]


def parallel(model, *, find_unused):
    """The model as each process trains it: itself alone, or under torchrun wrapped in
    DistributedDataParallel on this process's device (find_unused: some parameters may get no
    gradient in a step)."""
    if WORLD == 1:
        return model
    device = next(model.parameters()).device
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None,
        find_unused_parameters=find_unused)


def uses_bf16(device, precision="auto"):
    """Whether the backbone runs in bf16 autocast: on a GPU that computes bf16 natively (not the
    emulation of a T4 or V100), unless --precision fp32."""
    if device.type != "cuda" or precision == "fp32":
        return False
    return torch.cuda.is_bf16_supported(including_emulation=False)


def precision_name(device, precision="auto"):
    """What the features are computed in, for the cache keys: bf16 or fp32."""
    return "bf16" if uses_bf16(device, precision) else "fp32"


def autocast(device, precision="auto"):
    """bf16 autocast for the backbone where uses_bf16, else nothing."""
    if uses_bf16(device, precision):
        return torch.autocast("cuda", torch.bfloat16)
    return contextlib.nullcontext()
