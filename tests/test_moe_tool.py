"""The rest of the tool knows mixture-of-experts checkpoints: evaluation in the loop and after training,
`convert average`, branches, the finite-weights check, `kumihimo doctor` and Slurm rendering.

One small MoE run (tiny-moe-cpu, 2 layers, 4 experts) trains at EP=2 on 2 gloo processes, saving at
steps 1 and 2 and scoring a task in the loop at step 2; the slow tests use its checkpoints at other
layouts (one process, EP=1), which proves the expert weights reload whatever the expert layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kumihimo.cli import main
from kumihimo.core import configtree
from kumihimo.pretrain import checkpoint_format
from kumihimo.pretrain.config import TrainConfig
from tests.conftest import read_metrics, run_cli

TINY_MOE = "configs/pretrain/tiny-moe-cpu.yaml"
SMALL = ("model.num_layers=2", "schedule.lr_warmup_iters=0", "logging.log_interval=1")


# ------------------------------------------------------------------------------ fast: doctor, slurm


def test_doctor_sizes_a_checkpoint_with_every_expert():
    from kumihimo.doctor import checkpoint_gb
    from kumihimo.pretrain.plan import model_params

    moe = configtree.load(TrainConfig, TINY_MOE, [])
    dense = configtree.load(TrainConfig, TINY_MOE, ["model.moe.num_experts=0"])
    # 4 layers x 4 experts x SwiGLU(64 -> 64) and a router, against one dense SwiGLU(64 -> 192)
    extra = 4 * (4 * 3 * 64 * 64 + 4 * 64 - 3 * 64 * 192)
    assert model_params(moe.model, 1024) - model_params(dense.model, 1024) == extra
    assert checkpoint_gb(moe) == pytest.approx(
        12 * model_params(moe.model, 1024) / 2**30
    )  # fp32: weights + Adam


def test_slurm_and_pbs_render_the_expert_layout_and_refuse_one_that_does_not_fit(capsys, tmp_path):
    args = [
        "slurm",
        "submit",
        "configs/pretrain/llmjp4-32b-a3.8b.yaml",
        "--dry-run",
        f"output_dir={tmp_path}",
    ]
    assert main([*args, "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "# layout world=16: TP=1 PP=1 CP=1 DP=16 EP=4 ETP=1;" in out
    # 8x13B: TP 2 x PP 4 on one node leaves DP 1; EP 8 needs 8 ranks per stage
    code = main(["slurm", "submit", "configs/pretrain/llmjp3-8x13b.yaml", "--dry-run", "--nodes", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--nodes=1 x --gpus-per-node=8: parallelism.expert_model_parallel_size=8 x " in err
    # PBS scripts record the same layout
    pbs = ["pbs", "submit", "configs/pretrain/llmjp4-32b-a3.8b.yaml", "--dry-run", f"output_dir={tmp_path}"]
    assert main([*pbs, "--nodes", "2"]) == 0
    assert "# layout world=16: TP=1 PP=1 CP=1 DP=16 EP=4 ETP=1;" in capsys.readouterr().out


# ------------------------------------------------------------------------------ fast: checkpoint keys


def test_moe_layers_key_the_pre_mlp_norm_as_transformer_engine_does():
    """Megatron's TE spec keeps an MoE layer's separate pre-MLP norm as `pre_mlp_layernorm` (nothing in
    its key map renames it; a dense layer's is fused into linear_fc1); Megatron's local spec would rename
    it `mlp.linear_fc1.layer_norm_` for MoE layers too. Our local spec keeps that rename for dense layers
    only, so both implementations save the same keys. TE is not needed: its modules are stand-ins here."""
    from unittest import mock

    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.identity_op import IdentityOp

    from kumihimo.pretrain.model import layer_spec

    model = configtree.load(TrainConfig, TINY_MOE, []).model
    local_moe, local_dense = (layer_spec(model, "local", n).submodules for n in (4, None))
    assert local_moe.sharded_state_dict_keys_map == {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_"
    }
    assert local_dense.sharded_state_dict_keys_map["pre_mlp_layernorm."] == "mlp.linear_fc1.layer_norm_"
    with mock.patch.object(gpt_layer_specs, "TESpecProvider", mock.MagicMock()):
        te_moe, te_dense = (layer_spec(model, "transformer_engine", n).submodules for n in (4, None))
    assert te_moe.pre_mlp_layernorm is not IdentityOp and te_dense.pre_mlp_layernorm is IdentityOp
    assert not any(key.startswith("pre_mlp_layernorm") for key in te_moe.sharded_state_dict_keys_map)


KEYS = """
import json, sys, torch.distributed as dist
from kumihimo.pretrain import cpu_compat
cpu_compat.activate()
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from kumihimo.core import configtree
from kumihimo.pretrain.config import TrainConfig
from kumihimo.pretrain.model import build_model, sharded_tensors
from kumihimo.pretrain.parallel import ParallelLayout
parallel_state.initialize_model_parallel(1, 1)
model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
keys = {}
for dense_first in (0, 1):
    c = configtree.load(TrainConfig, sys.argv[1], ["model.num_layers=3", f"model.moe.dense_first_layers={dense_first}"])
    (chunk,) = build_model(
        c.model, c.precision, c.parallelism, c.fusions, ParallelLayout.from_config(c, 1), 1024,
        device=c.runtime.device, seed=c.runtime.seed, deterministic=c.runtime.deterministic,
        micro_batch_size=c.schedule.micro_batch_size, reset_position_ids=c.data.reset_position_ids,
    )
    keys[dense_first] = sorted({st.key for st in sharded_tensors(chunk.sharded_state_dict()) if "norm" in st.key})
print(json.dumps(keys))
"""


def test_moe_checkpoints_key_the_pre_mlp_norm_pre_mlp_layernorm(tmp_path):
    """The trainer's MoE GPTModel (local layers, as on CPU) saves an MoE layer's pre-MLP norm as
    `pre_mlp_layernorm.weight`, as Transformer Engine layers and Megatron-LM's MoE checkpoints do; a
    dense first layer keeps `mlp.linear_fc1.layer_norm_weight`."""
    keys = json.loads(_run_script(tmp_path / "keys.py", KEYS))
    qkv, q, k = (
        f"self_attention.{name}"
        for name in ("linear_qkv.layer_norm_weight", "q_layernorm.weight", "k_layernorm.weight")
    )
    stacked = ["decoder.final_layernorm.weight"] + [
        f"decoder.layers.{n}" for n in ("pre_mlp_layernorm.weight", k, q, qkv)
    ]
    assert keys["0"] == sorted(stacked)
    per_layer = [f"decoder.layers.{layer}.{n}" for layer in range(3) for n in (qkv, q, k)]
    per_layer += ["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"]
    per_layer += [f"decoder.layers.{layer}.pre_mlp_layernorm.weight" for layer in (1, 2)]
    assert keys["1"] == sorted(["decoder.final_layernorm.weight", *per_layer])


# ------------------------------------------------------------------------------ slow: one EP=2 run


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moe-tool")


@pytest.fixture(scope="module")
def tasks(work) -> Path:
    from tests.eval_tasks import write_tasks

    write_tasks(work / "tasks", ("jcqa",))
    return work / "tasks"


@pytest.fixture(scope="module")
def ep2_run(work, tasks) -> dict[str, Path]:
    from tests.test_convert_to_hf import train_spm

    tokenizer = train_spm(work / "tok", seed=3)
    run = {"run": work / "run", "ckpt": work / "ckpt", "tokenizer": tokenizer}
    proc = run_cli(
        "train", TINY_MOE, *SMALL,
        "parallelism.expert_model_parallel_size=2",
        "schedule.train_iters=2", "checkpoint.save_interval=1", "checkpoint.keep_last=null",
        "schedule.eval_interval=2", "schedule.eval_iters=1",
        f"data.tokenizer={tokenizer}", f"evaluation.tasks=[{tasks}]", "evaluation.batch_size=4",
        f"output_dir={run['run']}", f"checkpoint.dir={run['ckpt']}",
        "--nproc-per-node", "2", timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def samples(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples_jcqa.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_in_loop_and_after_training_evaluation_agree_across_expert_layouts(ep2_run, tasks, work):
    """The in-loop scores of the EP=2 run equal `kumihimo eval` of its checkpoint in one process."""
    metrics = read_metrics(ep2_run["run"])
    assert [m["step"] for m in metrics if "val_loss" in m] == [2]
    in_loop = ep2_run["run"] / "eval" / "iter_0000002"
    output = work / "eval"
    proc = run_cli("eval", str(ep2_run["ckpt"]), "--tasks", str(tasks), "--output", str(output), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = samples(next(output.glob("iter_*")) if not (output / "samples_jcqa.jsonl").exists() else output)
    during = samples(in_loop)
    assert len(after) == len(during) == 5
    for x, y in zip(after, during, strict=True):
        assert max(abs(p - q) for p, q in zip(x["loglikelihoods"], y["loglikelihoods"], strict=True)) < 1e-4


@pytest.mark.slow
def test_average_of_moe_checkpoints_averages_every_expert(ep2_run, work):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    def whole(folder: Path) -> dict:
        target = work / f"{folder.parent.name}-{folder.name}.pt"
        dcp_to_torch_save(str(folder), str(target))
        return torch.load(target, weights_only=False)

    sources = [checkpoint_format.iteration_dir(ep2_run["ckpt"], step) for step in (1, 2)]
    output = work / "avg"
    assert main(["convert", "average", *map(str, sources), "--output", str(output)]) == 0
    averaged = whole(checkpoint_format.iteration_dir(output, 0))
    first, second = whole(sources[0]), whole(sources[1])
    experts = [key for key in averaged if ".mlp.experts." in key and isinstance(averaged[key], torch.Tensor)]
    assert experts and any(".mlp.router." in key for key in averaged)
    for key in experts:
        assert torch.allclose(averaged[key], (first[key] + second[key]) / 2, atol=1e-7), key
        assert not torch.equal(averaged[key], first[key]), key


@pytest.mark.slow
def test_branch_from_an_expert_parallel_checkpoint(ep2_run, work):
    """A branch starts from the EP=2 run's model and optimizer state (at EP=2; at EP=1 Megatron keeps
    the optimizer as one part instead of dense + experts, which is refused in one line)."""
    branch = work / "branch"
    common = (
        "train", TINY_MOE, *SMALL, "schedule.train_iters=1", "schedule.eval_interval=0",
        f"data.tokenizer={ep2_run['tokenizer']}", f"branch.source={ep2_run['ckpt']}",
    )  # fmt: skip
    proc = run_cli(*common, f"output_dir={work / 'refused'}", timeout=300)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"kumihimo: error: {ep2_run['ckpt'] / 'iter_0000002'} was saved at expert_model_parallel_size=2, whose "
            "optimizer state does not load at 1"
        )
    )
    proc = run_cli(
        *common, "parallelism.expert_model_parallel_size=2", f"output_dir={branch}", "--nproc-per-node", "2",
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "branched from" in proc.stderr
    (step,) = read_metrics(branch)
    assert "moe_tokens_per_expert" in step and step["loss"] < 7.0


@pytest.mark.slow
def test_resume_with_other_experts_is_refused(ep2_run, work):
    proc = run_cli(
        "train", TINY_MOE, *SMALL, "schedule.train_iters=3", "schedule.eval_interval=0",
        "model.moe.num_experts=2", f"data.tokenizer={ep2_run['tokenizer']}",
        f"output_dir={work / 'other-experts'}", f"checkpoint.load={ep2_run['ckpt']}",
        f"checkpoint.dir={work / 'other-experts' / 'ckpt'}", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "holds another model shape (model.moe.num_experts 4 -> 2)" in proc.stderr


POISON = """
import sys, torch, torch.distributed as dist
from kumihimo.pretrain import cpu_compat
cpu_compat.activate()
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from kumihimo.core import configtree
from kumihimo.pretrain import integrity
from kumihimo.pretrain.config import TrainConfig
from kumihimo.pretrain.model import build_model
from kumihimo.pretrain.parallel import ParallelLayout
config = configtree.load(TrainConfig, sys.argv[1], ["model.num_layers=2"])
parallel_state.initialize_model_parallel(1, 1)
model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
c = config
(chunk,) = build_model(
    c.model, c.precision, c.parallelism, c.fusions, ParallelLayout.from_config(c, 1), 1024,
    device=c.runtime.device, seed=c.runtime.seed, deterministic=c.runtime.deterministic,
    micro_batch_size=c.schedule.micro_batch_size, reset_position_ids=c.data.reset_position_ids,
)
weight = chunk.decoder.layers[1].mlp.experts.local_experts[2].linear_fc1.weight
with torch.no_grad():
    weight[3, 5] = float("nan")
bad, total, names = integrity.count_nonfinite([chunk], None, torch.device("cpu"))
print(f"{bad} of {total} bad: {', '.join(names)}")
"""


@pytest.mark.slow
def test_finite_check_names_a_poisoned_expert(tmp_path):
    """A NaN in one expert's weight is found by the check every save runs (integrity.count_nonfinite)."""
    last = _run_script(tmp_path / "poison.py", POISON)
    assert last.startswith("1 of ") and last.endswith(
        " bad: decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight"
    )


def _run_script(script, text: str) -> str:
    """Run `text` as a Python file (with TINY_MOE as its argument) in a fresh process; its last line."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    script.write_text(text)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(script), TINY_MOE],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]
