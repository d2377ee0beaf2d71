"""Real 2-process DDP and FSDP2 on CPU (gloo): every rank takes the same topology decisions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seft_trl.kernels import SamplingPattern

SCRIPT = Path(__file__).parent / "ddp_train.py"
ACCELERATE_CONFIGS = Path(__file__).parents[1] / "recipes" / "accelerate"
# The recipes' CPU launch configs: 2 processes over gloo, DDP or FSDP2.
LAUNCHER = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / "cpu_ddp.yaml")]
# accelerate runs FSDP only on accelerator devices; fsdp_on_cpu.py lets its FSDP2 path run on gloo. On two
# or more GPUs, make gpu-check points SEFT_TEST_FSDP2_CONFIG at the GPU launch config (fp32, 2 processes).
if os.environ.get("SEFT_TEST_FSDP2_CONFIG"):
    FSDP2_LAUNCHER = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                      os.environ["SEFT_TEST_FSDP2_CONFIG"], "--num_processes", "2", "--mixed_precision", "no"]
else:
    FSDP2_LAUNCHER = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                      str(ACCELERATE_CONFIGS / "fsdp2_cpu.yaml"), str(Path(__file__).parent / "fsdp_on_cpu.py")]


def run(command: list[str], env_extra: dict[str, str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **env_extra}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The reference: the same script in one process with the same global batch (4), fp32; run once per module."""
    folder = tmp_path_factory.mktemp("single")
    run([sys.executable, str(SCRIPT), str(folder), "4"], {})
    return folder


def test_two_process_ddp_ranks_agree_and_match_a_single_process(tmp_path, single):
    run([*LAUNCHER, str(SCRIPT), str(tmp_path / "ddp"), "2"], {"OMP_NUM_THREADS": "1"})
    assert_matches_single_process(load_ranks_agreeing(tmp_path / "ddp"), single)


def test_two_process_fsdp2_shards_deltas_and_matches_a_single_process(tmp_path, single):
    run([*FSDP2_LAUNCHER, str(SCRIPT), str(tmp_path / "fsdp2"), "2"], {"OMP_NUM_THREADS": "1"})
    rank0 = load_ranks_agreeing(tmp_path / "fsdp2", sharded=True)
    assert all(rank0["sharded"])  # every step ran on DTensor chunks of the weights and deltas
    assert_matches_single_process(rank0, single)


def test_fsdp2_with_bf16_mixed_precision_and_gradient_checkpointing_keeps_ranks_identical_and_within_budget(tmp_path,
                                                                                                             single):
    options = ["bf16=true", "gradient_checkpointing=true"]
    run([*FSDP2_LAUNCHER, str(SCRIPT), str(tmp_path / "bf16"), "2", *options], {"OMP_NUM_THREADS": "1"})
    rank0 = load_ranks_agreeing(tmp_path / "bf16", sharded=True)  # bitwise the same topology on both ranks
    assert all(rank0["sharded"])
    fp32 = torch.load(single / "rank0.pt")  # one process
    losses, reference = torch.tensor(list(rank0["losses"].values())), torch.tensor(list(fp32["losses"].values()))
    assert not torch.equal(losses, reference)  # really in bf16
    torch.testing.assert_close(losses, reference, rtol=0, atol=2e-2)


def test_ddp_and_fsdp2_with_the_dense_parent_as_teacher_keep_ranks_identical(tmp_path):
    # DDP replicates the teacher on each rank, FSDP2 shards it as it shards the student; revivals start at the
    # parent's values, read from the (gathered) teacher on every rank alike.
    from seft_trl.testing import tiny_model

    parent = {name: p.detach() for name, p in tiny_model().named_parameters()}
    for launcher, name, sharded in ((LAUNCHER, "ddp", False), (FSDP2_LAUNCHER, "fsdp2", True)):
        run([*launcher, str(SCRIPT), str(tmp_path / name), "2", "teacher=true"], {"OMP_NUM_THREADS": "1"})
        rank0 = load_ranks_agreeing(tmp_path / name, sharded=sharded)
        assert rank0["teacher_sharded"] is sharded
        assert all(torch.equal(rank0["teacher"][key], value) for key, value in parent.items())  # never trained
        assert rank0["divergence"] and all(value > 0 for value in rank0["divergence"])


def assert_matches_single_process(rank0: dict, single_dir: Path) -> None:
    single = torch.load(single_dir / "rank0.pt")
    assert single["world_size"] == 1 and not single["reduced"] and not any(single["sharded"])

    # Same global batch (2 x 2 vs 4): the same run up to floating-point reduction order, which can
    # flip a swap whose predicted gain and cost are within rounding of each other.
    torch.testing.assert_close(torch.tensor(list(rank0["losses"].values())), torch.tensor(list(single["losses"].values())),
                               rtol=1e-3, atol=1e-3)
    same = total = close = numel = 0
    for name, (index, delta, weight) in rank0["state"].items():
        reference_index, reference_delta, reference_weight = single["state"][name]
        same += int(torch.isin(index, reference_index).sum())
        total += index.numel()
        close += int(torch.isclose(weight, reference_weight, rtol=1e-3, atol=1e-3).sum())
        numel += weight.numel()
    assert same / total > 0.99 and close / numel > 0.99


def load_ranks_agreeing(output_dir: Path, sharded: bool = False) -> dict:
    """Rank 0's record, after checking that both ranks ran real DDP (or FSDP2) and hold bitwise the same SEFT
    state (the whole weights and deltas, gathered under FSDP2), within budget after every step."""
    rank0, rank1 = (torch.load(output_dir / f"rank{r}.pt") for r in (0, 1))
    assert rank0["world_size"] == 2 and rank0["reduced"]  # statistics summed over ranks
    assert rank0["revived"] > 0  # topology really evolved
    for name, (index, delta, weight) in rank0["state"].items():
        other = rank1["state"][name]
        assert torch.equal(index, other[0]) and torch.equal(delta, other[1]) and torch.equal(weight, other[2])
    assert rank0["pattern_builds"] == rank1["pattern_builds"]
    assert rank0["violations"] == [0] * len(rank0["violations"]) == rank1["violations"]
    if not sharded:  # DDP broadcasts buffers before every forward, but none of SEFT's (about 12 bytes per delta)
        assert rank0["broadcast_buffers"] > 0 and rank0["broadcast_seft_buffers"] == 0
    return rank0


def test_ddp_with_8bit_adam_and_accumulation_builds_sampling_patterns_only_after_topology_changes(tmp_path):
    # Density 1% takes the sampled kernel, whose CSR pattern is cached on delta_index's version: a
    # rewrite of the positions on every step (a broadcast that bumps it) would rebuild it every step.
    options = {"optim": '"adamw_8bit"', "gradient_accumulation_steps": "2", "seft_density": "0.01",
               "seft_update_interval": "4", "seft_accumulation_steps": "1", "max_steps": "9"}
    run([*LAUNCHER, str(SCRIPT), str(tmp_path), "2", *(f"{key}={value}" for key, value in options.items())],
        {"OMP_NUM_THREADS": "1"})
    rank0 = load_ranks_agreeing(tmp_path)
    for index, _, weight in rank0["state"].values():  # the sampled path, not dense-then-gather
        assert SamplingPattern(index, *weight.shape).kernel != "dense"

    builds = [total for total, _ in rank0["pattern_builds"]]
    per_step = [builds[0], *(after - before for before, after in zip(builds, builds[1:]))]
    updated = [changed for _, changed in rank0["pattern_builds"]]
    layers = len(rank0["state"])
    assert per_step[0] == layers  # the first step builds every layer's pattern once
    # A rebuild is due only in the step after a topology update; steps 4 and 8 update (interval 4).
    ordinary = [step for step in range(1, len(per_step)) if not updated[step - 1]]
    assert len(ordinary) >= 5 and sum(updated) == 2
    assert [per_step[step] for step in ordinary] == [0] * len(ordinary)


def test_fsdp2_resumes_inside_a_window_exactly_and_saves_a_plain_merged_model(tmp_path):
    from transformers import AutoModelForCausalLM

    # Update interval 2 with a 2-step window: the checkpoint after step 3 holds an open window.
    options = ['save_strategy="steps"', "save_steps=3", "max_steps=6"]
    run([*FSDP2_LAUNCHER, str(SCRIPT), str(tmp_path / "straight"), "2", *options,
         f'final_dir="{tmp_path / "merged"}"'], {"OMP_NUM_THREADS": "1"})
    run([*FSDP2_LAUNCHER, str(SCRIPT), str(tmp_path / "interrupted"), "2", *options, "stop_at=3"], {"OMP_NUM_THREADS": "1"})
    checkpoint = tmp_path / "interrupted" / "checkpoint-3"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()  # a sharded checkpoint, written by accelerate
    assert any(key.endswith("window_grad_sum") for key in torch.load(checkpoint / "seft_window.pt"))
    run([*FSDP2_LAUNCHER, str(SCRIPT), str(tmp_path / "interrupted"), "2", *options, f'resume="{checkpoint}"'],
        {"OMP_NUM_THREADS": "1"})

    straight = load_ranks_agreeing(tmp_path / "straight", sharded=True)
    resumed = load_ranks_agreeing(tmp_path / "interrupted", sharded=True)
    assert [resumed["losses"][step] for step in (4, 5, 6)] == [straight["losses"][step] for step in (4, 5, 6)]
    for name, (index, delta, weight) in straight["state"].items():
        assert torch.equal(resumed["state"][name][0], index)
        assert torch.equal(resumed["state"][name][1], delta)
        assert torch.equal(resumed["state"][name][2], weight)

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()  # plain transformers
    for name, (_, _, weight) in straight["state"].items():
        assert torch.equal(merged[name + ".weight"], weight)  # W' exactly, zeros included
    report = json.loads((tmp_path / "merged" / "sparsity_report.json").read_text())
    assert report["total"]["within_budget"]


def test_moved_slot_state_of_sharded_deltas_is_written_chunk_by_chunk(tmp_path):
    # torch AdamW and torchao's 8-bit AdamW on a delta tensor FSDP2 splits over 2 ranks: seeding slots
    # on both chunks leaves each rank's state equal to its chunk of an unsharded optimizer's, seeded alike.
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(Path(__file__).parent / "fsdp_optim_state.py"),
         str(tmp_path)], {"OMP_NUM_THREADS": "1"})
    for rank in (0, 1):
        record = torch.load(tmp_path / f"rank{rank}.pt")
        assert record["torchao_8bit"]["8bit"]  # really the quantized state
        for name, result in record.items():
            assert result["owned"] == 4 and result["equal"] and result["seeded"], (rank, name)


def test_fsdp2_in_a_plain_loop_resumes_from_a_distributed_checkpoint_and_the_window_state(tmp_path):
    # The README's plain-loop recipe: SparsityEvolution, then fully_shard, then the optimizer; a checkpoint of
    # torch.distributed.checkpoint plus seft.window_state() inside a window resumes bitwise.
    for mode in ("straight", "stop", "resume"):
        run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(Path(__file__).parent / "fsdp_loop.py"),
             str(tmp_path), mode], {"OMP_NUM_THREADS": "1"})
    straight, resumed, other = (torch.load(tmp_path / name) for name in ("straight_rank0.pt", "resume_rank0.pt", "resume_rank1.pt"))
    assert straight["revived"] > resumed["revived"] > 0  # updates at steps 4 and 8; the resumed run makes the second
    assert resumed["losses"] == {step: straight["losses"][step] for step in (7, 8)}
    for name, tensors in straight["state"].items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, resumed["state"][name]))
        assert all(torch.equal(a, b) for a, b in zip(other["state"][name], resumed["state"][name]))
