import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_benchmark_writes_its_table(tmp_path):
    out = tmp_path / "bench.json"
    parts = "ridge,step,subjects,extract,head,scaling,stats,downstream"  # all but fullscale
    env = dict(os.environ, BRAINTUNE_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "bench.py", "--quick", "--only", parts, "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["machine"]["quick"] is True and res["matmul_gflops"] > 0
    r = res["ridge"]
    assert r["seconds"] > 0 and abs(sum(r["share"].values()) - 1) < 1e-6
    if "himalaya_seconds" in r:  # the peer, when installed: same answer
        assert r["same_lambda"] >= 0.999 and r["max_rel_W_diff"] < 1e-4
    for k in ("step_lora", "step_lora_nodrop", "step_full"):
        assert res[k]["step_over_forward"] > 1  # a step does strictly more than a forward
    assert [x["v"] for x in res["scaling_ridge_v"]] == [2000, 4000]
    assert [x["subjects"] for x in res["step_subjects"]] == [1, 2,
                                                             3] and "with 3 subject(s)" in p.stdout
    assert "fp32 matmul" in p.stdout and "ridge n=800" in p.stdout
    down = res["downstream"]  # every clip of the folder, two backbones, every layer pooled
    sizes = {k: v for k, v in down["folder"].items() if k != "words"}
    assert down["full_size"]["splits"] == sizes  # each split's list as written
    assert down["base"]["splits"] == dict.fromkeys(sizes, 4)  # the limit, per split
    assert down["base"]["layers"] == 4 and down["full_size"]["layers"] == 1
    assert down["full_size"]["private_gb"] > 0 and "clips x 2 backbones" in p.stdout
    assert "extraction tiny" in p.stdout and "head step" in p.stdout and "statistics" in p.stdout


def test_dropout_masks_are_drawn_only_where_there_is_dropout():
    import bench
    wave = torch.randn(2, 16000)
    assert bench.mask_seconds(bench.backbone("tiny", 0.0), wave, 3, 1) == 0.0
    assert bench.mask_seconds(bench.backbone("tiny", 0.1), wave, 3, 1) > 0.0


def test_the_gpu_check_runs_every_part_and_writes_its_table(tmp_path):
    """python bench.py --gpu, scaled down on the CPU where there is no GPU: every check's row,
    and the checks that hold on any device (a resumed run with dropout equals an uninterrupted
    one, eval.py reads the run's caches) pass."""
    import bench_gpu
    rows = bench_gpu.main(str(tmp_path / "gpu.json"), quick=True)
    table = (tmp_path / "gpu.md").read_text()
    assert table.count("\n| ") == len(rows) + 1 and "scaled down" in table
    verdict = {what.split(":")[0].strip(): ok for what, _, _, ok in rows}
    for check in ("CPU against the device, float32", "a resumed run with dropout against an "
                  "uninterrupted one", "its weights, where the lambda is the same"):
        assert verdict[check], table
    assert any(w.startswith("eval.py on the run") and ok for w, _, _, ok in rows), table
    for what in ("ridge 800 x 96 x 500", "brainwavlm whole-cortex step", "stage 1 of a whole",
                 "moussa2025 protocol's extraction"):
        assert what in table
