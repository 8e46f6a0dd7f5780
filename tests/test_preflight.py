"""preflight.py's memory estimate at the real dataset's sizes, on a GPU as the estimate sees one
(its free memory mocked): what each stage holds, refused before stage 1 with the numbers."""
import pytest
import torch

import config
import preflight

GB = 2 ** 30


def whole_subjects(n, voxels=81_126):
    """n subjects of UTS01's size as the pre-flight lists them: 83 training stories of 321 rows."""
    stories = [f"story{i:02d}" for i in range(83)]
    return [preflight.Listing(f"UTS0{k + 1}", voxels, dict(train=stories, val=[], test=[]),
                              {s: 321 for s in stories}, {s: 650.0 for s in stories})
            for k in range(n)]


@pytest.fixture
def gpu_free(monkeypatch):
    """free[0] bytes free on the GPU; the host has plenty."""
    free = [80 * GB]
    monkeypatch.setattr(preflight, "free_memory",
                        lambda device: free[0] if device.type == "cuda" else 500 * GB)
    return free


def test_the_heads_of_three_whole_subjects_are_counted_on_the_gpu(gpu_free):
    args = config.parse(["--recipe", "li2024", "--data", "ds", "--subject", "S01,S02,S03"])
    cuda = torch.device("cuda", 0)
    preflight.check_sizes(args, whole_subjects(3), cuda)  # fits on an 80 GB card
    gpu_free[0] = 20 * GB
    with pytest.raises(ValueError) as refused:
        preflight.check_sizes(args, whole_subjects(3), cuda)
    said = str(refused.value)
    # 3 heads of 81,126 voxels x 4,608 features: 4.2 GB, held four times (the parameters, their
    # gradients, Adam's two moments); the best-epoch and checkpoint copies are on the host
    assert said.startswith("--roi or --bottleneck: stage 2 would need about 2")
    assert "3 head(s) with gradients and Adam moments 16.7 GB" in said
    assert "on cuda:0" in said and "it has 20.0 GB free" in said
    preflight.check_sizes(args, whole_subjects(1), cuda)  # one subject fits in 20 GB


def test_brainwavlm_whole_cortex_fits_a_gpu_and_fp32_is_told_to_use_bf16(gpu_free):
    args = config.parse(["--recipe", "brainwavlm", "--data", "ds"])
    cuda = torch.device("cuda", 0)
    preflight.check_sizes(args, whole_subjects(1), cuda)  # the bottleneck head is small
    args = config.parse(["--recipe", "brainwavlm", "--data", "ds", "--batch-size", "1024",
                         "--precision", "fp32"])
    with pytest.raises(ValueError, match=r"--batch-size: stage 2 would need about .* \(a "
                                         r"training batch of 1024 windows .* keeps the global "
                                         r"batch of B\), or let the backbone run in bf16"):
        preflight.check_sizes(args, whole_subjects(1), cuda)


def test_the_host_holds_the_features_and_the_heads_copies(gpu_free, monkeypatch):
    args = config.parse(["--recipe", "li2024", "--data", "ds", "--subject", "S01,S02,S03"])
    monkeypatch.setattr(preflight, "free_memory",
                        lambda device: 500 * GB if device.type == "cuda" else 8 * GB)
    with pytest.raises(ValueError, match="the host would need about .* on cpu .*stage 1's ridge "
                                         "weights 4.2 GB"):
        preflight.check_sizes(args, whole_subjects(3), torch.device("cuda", 0))
