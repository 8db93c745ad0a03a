"""Two CPU processes with torchrun (gloo) give the single-process run's losses and adapter: data
parallel (DDP) and sharded (FSDP2, training_config.fsdp)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_argv
from safetensors.torch import load_file

from lorafit.demo import demo_data_dir

TOL = 1e-5  # relative; fp32 sums over a different number of micro-batch pieces
# adapters (weights O(0.1)) of FSDP with 2 micro-batches per rank vs one batch of 4: Adam's first steps
# (about lr * sign(g)) amplify last-bit differences on near-zero gradients; measured 1.6e-5
SHARDED_ATOL = 5e-5


def _train(
    tiny: Path, out: Path, nproc: int, per_device: int, extra: list[str] = ()
) -> subprocess.CompletedProcess:
    data = demo_data_dir()
    sets = [
        "training_config.max_steps=4", "training_config.logging_steps=1", "training_config.save_steps=2",
        "training_config.max_seq_length=128", f"training_config.per_device_train_batch_size={per_device}",
        "training_config.learning_rate=5e-3", "peft_config.r=4",
        # fp32: on a CPU with fast bf16 (auto -> bf16 autocast) oneDNN picks kernels by batch shape, and
        # bf16 rounding of 2 x 2 vs 1 x 4 rows would hide what is compared here (the reduction's exactness)
        "training_config.bf16=false",
    ]  # fmt: skip
    args = train_argv(tiny, data / "train.jsonl", out, *extra, eval_data=data / "eval.jsonl", sets=sets)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "lorafit", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "lorafit", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def _assert_losses_match(one: Path, other: Path, run: subprocess.CompletedProcess, batch: str) -> None:
    """`other`'s per-step losses equal `one`'s (4 logged steps) and `run` printed its effective batch."""
    a, b = _losses(one), _losses(other)
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, rel=TOL)
    assert f"effective batch {batch} = 4 rows" in run.stderr + run.stdout


def _assert_adapters_close(one: Path, other: Path, atol: float) -> dict:
    """Both adapters hold the same tensors to `atol`; returns `one`'s."""
    a = load_file(str(one / "adapter_model.safetensors"))
    b = load_file(str(other / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.allclose(a[k], b[k], rtol=0, atol=atol), k
    return a


def _assert_same_files(one: Path, other: Path, *subdirs: str) -> None:
    """The same file names (in the run folder and `subdirs`) and as many metrics lines: rank 0 wrote alone."""
    names = lambda p: sorted(x.name for x in p.iterdir())  # noqa: E731
    for sub in ("", *subdirs):
        assert names(one / sub) == names(other / sub)
    lines_one = (one / "metrics.jsonl").read_text().splitlines()
    lines = (other / "metrics.jsonl").read_text().splitlines()
    assert len(lines_one) == len(lines)  # no duplicated log lines from rank 1


# evaluations at steps 2 and 4 print a line each; do_eval is a key lorafit ignores with a warning
SAID = ["--set", "training_config.eval_strategy=steps", "--set", "training_config.eval_steps=2",
        "--set", "training_config.do_eval=true"]  # fmt: skip


def _assert_said_once(run: subprocess.CompletedProcess) -> None:
    """The eval lines of steps 2 and 4 and the do_eval config warning were printed once (by rank 0)."""
    lines = (run.stdout + run.stderr).splitlines()
    assert [x.split(":")[0] for x in lines if ": eval_loss " in x] == ["step 2", "step 4"]
    assert len([x for x in lines if "do_eval" in x]) == 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("dist")
    one = _train(tiny_model, root / "one", nproc=1, per_device=4, extra=SAID)
    two = _train(tiny_model, root / "two", nproc=2, per_device=2, extra=SAID)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    return root, one, two


def test_two_ranks_give_the_single_process_losses(runs):
    root, _, two = runs
    _assert_losses_match(root / "one", root / "two", two, "2 x 1 accumulation x 2 processes")


def test_only_rank_zero_writes(runs):
    root, _, _ = runs
    _assert_same_files(root / "one", root / "two")


def test_only_rank_zero_prints_eval_lines_and_config_warnings(runs):
    _, one, two = runs
    _assert_said_once(one)
    _assert_said_once(two)


def test_the_distributed_adapter_matches(runs):
    root, _, _ = runs
    # weights are O(0.1); fp32 sums in another order differ in the last bits and Adam's first steps
    # (about lr * sign(g)) amplify that on near-zero gradients: measured max |diff| 6.7e-6 with SDPA's math
    # path; with its fused CPU kernel (lorafit.attention) 3.8e-5 on one element of 1408 (layer 0's
    # down_proj lora_A), every other weight within 3.1e-6
    _assert_adapters_close(root / "one", root / "two", atol=SHARDED_ATOL)
    res_one = json.loads((root / "one" / "results.json").read_text())
    res_two = json.loads((root / "two" / "results.json").read_text())
    assert res_two["eval_loss"] == pytest.approx(res_one["eval_loss"], rel=1e-4)
    assert res_two["tokens"] == res_one["tokens"]


def test_distributed_resume_matches_the_uninterrupted_run(runs, tiny_model):
    """2 ranks, dropout on: stop after step 2 (its final checkpoint), resume to step 4 = a straight run."""
    root, _, _ = runs
    common = ["--set", "peft_config.lora_dropout=0.1", "--set", "training_config.lr_scheduler_type=constant",
              "--set", "data.eval="]  # fmt: skip
    straight = _train(tiny_model, root / "straight", nproc=2, per_device=2, extra=common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = _train(tiny_model, root / "resumed", nproc=2, per_device=2,
                   extra=[*common, "--set", "training_config.max_steps=2"])  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    again = _train(tiny_model, root / "resumed", nproc=2, per_device=2, extra=[*common, "--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr + again.stdout
    # the longer run (max_steps 2 -> 4) is one warning, by rank 0, not one per rank
    assert (again.stderr + again.stdout).count("the run now has 4 steps, the checkpoint's had 2") == 1
    assert _losses(root / "resumed") == _losses(root / "straight")
    a = load_file(str(root / "straight" / "adapter_model.safetensors"))
    b = load_file(str(root / "resumed" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------- sharded (FSDP2)


@pytest.fixture(scope="module")
def sharded(runs, tiny_model):
    """2 ranks with FSDP: 1 row x 2 micro-batches each (no gradient sync on the first), and 3 eval rows per
    batch, which gives 7 eval batches for 2 ranks (rank 1 runs a padding batch); and a resume of its
    checkpoint-2, sharded again."""
    root, _, _ = runs
    fsdp = ["--set", "training_config.fsdp=full_shard", "--set", "training_config.per_device_eval_batch_size=3",
            *SAID]  # fmt: skip
    run = _train(tiny_model, root / "fsdp", nproc=2, per_device=1,
                 extra=[*fsdp, "--set", "training_config.gradient_accumulation_steps=2"])  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    again = _train(tiny_model, root / "fsdp-resumed", nproc=2, per_device=1,
                   extra=[*fsdp, "--set", "training_config.gradient_accumulation_steps=2",
                          "--resume", str(root / "fsdp" / "checkpoint-2")])  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    return root, run, again


def test_sharded_ranks_give_the_single_process_losses(sharded):
    root, run, _ = sharded
    _assert_losses_match(root / "one", root / "fsdp", run, "1 x 2 accumulation x 2 processes")  # 1.3e-7
    assert "sharded (FSDP2) over 2 processes: each holds 435,008 of the 870,016 parameters" in run.stderr
    res_one = json.loads((root / "one" / "results.json").read_text())
    res = json.loads((root / "fsdp" / "results.json").read_text())
    # eval batches of 3 (uneven over 2 ranks) against 4: the same token-weighted sum, in another order
    assert res["eval_loss_before"] == pytest.approx(res_one["eval_loss_before"], rel=1e-5)
    assert res["eval_loss"] == pytest.approx(res_one["eval_loss"], rel=1e-4)
    assert res["tokens"] == res_one["tokens"] and res["trainable_params"] == res_one["trainable_params"]


def test_the_sharded_adapter_is_whole_and_matches(sharded, tiny_model, tmp_path):
    root, _, _ = sharded
    # as DDP's, with 2 micro-batches summed per rank on top: measured max |diff| 1.6e-5
    a = _assert_adapters_close(root / "one", root / "fsdp", atol=SHARDED_ATOL)
    from lorafit import lora
    from lorafit.config import ModelConfig
    from lorafit.model import load_model

    model = load_model(ModelConfig(name_or_path=str(tiny_model), device="cpu"), training=False)
    assert len(lora.load_adapter(model, root / "fsdp")) == 16
    # the checkpoint's AdamW state is whole too (an unsharded run's format), one entry per LoRA tensor
    ts = torch.load(root / "fsdp" / "checkpoint-2" / "training_state.pt", weights_only=True)
    shapes = sorted(tuple(s["exp_avg"].shape) for s in ts["optimizer"]["state"].values())
    assert shapes == sorted(tuple(t.shape) for t in a.values())


def test_only_rank_zero_writes_when_sharded(sharded):
    root, run, _ = sharded
    _assert_same_files(root / "one", root / "fsdp", "checkpoint-2")
    _assert_said_once(run)


def test_sharded_resume_matches_the_uninterrupted_run(sharded):
    root, _, again = sharded
    assert "resuming from" in again.stderr + again.stdout
    assert _losses(root / "fsdp-resumed") == _losses(root / "fsdp")
    a = load_file(str(root / "fsdp" / "adapter_model.safetensors"))
    b = load_file(str(root / "fsdp-resumed" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_sharded_checkpoint_resumes_in_one_process(sharded, tiny_model):
    """The checkpoint holds whole tensors (an unsharded run's format): one process with the same global
    batch continues it to the sharded run's losses and adapter, within the 1-vs-2 tolerances."""
    root, _, _ = sharded
    one = _train(tiny_model, root / "fsdp-then-one", nproc=1, per_device=2,
                 extra=["--set", "training_config.gradient_accumulation_steps=2",
                        "--resume", str(root / "fsdp" / "checkpoint-2")])  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    assert _losses(root / "fsdp-then-one") == pytest.approx(_losses(root / "fsdp"), rel=TOL)
    _assert_adapters_close(root / "fsdp", root / "fsdp-then-one", atol=SHARDED_ATOL)


def test_sharded_bf16_trains(runs, tiny_model):
    """bf16 autocast over the sharded model: it runs and learns (not compared bit by bit: bf16 rounding)."""
    root, _, _ = runs
    run = _train(tiny_model, root / "fsdp-bf16", nproc=2, per_device=2,
                 extra=["--set", "training_config.fsdp=true", "--set", "training_config.bf16=true",
                        "--set", "data.eval=", "--set", "training_config.max_steps=2"])  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "compute bf16" in run.stderr + run.stdout
    a, b = _losses(root / "one")[:2], _losses(root / "fsdp-bf16")
    assert b == pytest.approx(a, rel=1e-2)


def test_fsdp_on_one_process_warns_and_trains_unsharded(tiny_model, tmp_path, caplog):
    from lorafit.config import load_config
    from lorafit.job import prepare

    data = demo_data_dir() / "train.jsonl"
    run = load_config(overrides=[f"model.name_or_path={tiny_model}", f"data.train={data}",
                                 f"training_config.output_dir={tmp_path / 'out'}", "training_config.fsdp=true"])  # fmt: skip
    with caplog.at_level("WARNING", logger="lorafit"):
        job = prepare(run)
    assert not job.sharded and not job.dist.enabled
    assert "training_config.fsdp shards the model across processes, and this is one process" in caplog.text
