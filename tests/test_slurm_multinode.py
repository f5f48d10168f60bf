"""Jobs across nodes on a real Slurm: three network-namespace nodes on this machine
(tests/slurm_multinode.py), gloo on CPU, the tiny recipe on a tiny tokenized corpus.

Jobs are rendered by `kumihimo slurm submit --profile local-cpu` from the shipped slurm/*.sbatch, the
same scripts a 64-node job gets. Two nodes x two processes: DP=2 x TP=2, Megatron puts TP ranks next
to each other (0,1 and 2,3) and srun places tasks 0,1 on the first node, so tensor parallelism stays
inside a node and data parallelism crosses the bridge between the namespaces.

Every job costs ~50 s of start-up here (doctor and the trainer import torch in four processes on two
cores), so the jobs are few and short: one uninterrupted run of STRAIGHT_STEPS steps is the reference
for the requeued and the killed runs, which follow the same 300-step schedule and stop early.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from kumihimo.pretrain.distributed import interface_towards
from kumihimo.slurm import LAUNCHERS, script_body
from tests.conftest import read_metrics, run_cli
from tests.slurm_cluster import finished
from tests.slurm_multinode import MultiNodeCluster, running_multinode_cluster

pytestmark = pytest.mark.timeout(900)

TINY = "configs/pretrain/tiny-cpu.yaml"
COMMON = (
    "schedule.global_batch_size=16",
    "schedule.lr_warmup_iters=2",
    "schedule.eval_interval=0",
    "logging.log_interval=1",
)
LAYOUT = ("parallelism.tensor_model_parallel_size=2",)
# The schedule runs to NUM_STEPS; the reference run stops (saves and exits 0) after STRAIGHT_STEPS, and
# the interrupted runs are compared with it step for step, so they must resume before it ends.
NUM_STEPS = 300
STRAIGHT_STEPS = 40
SAVE_INTERVAL = 10
SCHEDULE = (f"schedule.train_iters={NUM_STEPS}", f"checkpoint.save_interval={SAVE_INTERVAL}")
STRAIGHT = (*SCHEDULE, f"schedule.exit_after_iters={STRAIGHT_STEPS}")
# Every run has the same schedule: the dataset's sample order depends on train_iters (the number of
# samples to index), so even step 1 differs between runs of different lengths on real data.
FOUR_STEPS = (*SCHEDULE, "schedule.exit_after_iters=4")


@pytest.fixture(scope="module")
def multinode(tmp_path_factory) -> MultiNodeCluster:
    with running_multinode_cluster(tmp_path_factory.mktemp("slurm-multinode")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(blend file, its tokenizer, another tokenizer): a tiny tokenized corpus on shared storage."""
    import sentencepiece as spm
    from test_data_prep_buckets import scored_run
    from test_data_prep_pipeline import JA, train_tiny_spm

    from kumihimo.data_prep.pipeline import build_datasets

    root = tmp_path_factory.mktemp("tokenized")
    (root / "spm").mkdir()
    tokenizer = train_tiny_spm(root / "spm")
    (root / "other").mkdir()
    (root / "other" / "train.txt").write_text("\n".join(JA), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(root / "other" / "train.txt"),
        model_prefix=str(root / "other" / "tiny"),
        vocab_size=900,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=0.98,
        minloglevel=2,
    )
    result = build_datasets(scored_run(root / "data"), tokenizer)
    return Path(result.blend_path), tokenizer, root / "other" / "tiny.model"


@pytest.fixture(scope="module")
def inputs(multinode, tokenized) -> tuple[str, ...]:
    """The data overrides of every job: the corpus on shared storage, and data.tokenizer a path in the
    node-local folder (each node's own, like local scratch) holding an equal copy on every node."""
    blend, tokenizer, _other = tokenized
    # node_local itself is what the submitting host (and the one-process reference) sees there
    for folder in [multinode.node_local] + [multinode.local_folder(n.name) for n in multinode.nodes]:
        shutil.copyfile(tokenizer, folder / "tiny.model")
    return (
        "data.mock=false",
        f"data.blend_file={blend}",
        f"data.tokenizer={multinode.node_local / 'tiny.model'}",
        # every split must hold a document of each source (Megatron loops forever on an empty one)
        "data.split=100,0,0",
    )


def dry_run_172b_on_64_nodes(launcher: str) -> str:
    """The batch script `kumihimo slurm submit --dry-run` renders for the 172B recipe on 64 nodes."""
    proc = run_cli(
        "slurm",
        "submit",
        "configs/pretrain/llmjp3-172b.yaml",
        "--nodes",
        "64",
        "--profile",
        "h100-ib",
        "--launcher",
        launcher,
        "--time",
        "48:00:00",
        "--dry-run",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def submit(
    cluster: MultiNodeCluster, inputs, output_dir: Path, *options: str, env: dict | None = None
) -> tuple[str, Path]:
    """`kumihimo slurm submit` the tiny recipe on 2 nodes x 2 processes; later overrides win."""
    proc = cluster.run(
        sys.executable,
        "-m",
        "kumihimo.cli",
        "slurm",
        "submit",
        TINY,
        *COMMON,
        *LAYOUT,
        *inputs,
        "--nodes",
        "2",
        "--gpus-per-node",
        "2",
        "--profile",
        "local-cpu",
        "--time",
        "00:10:00",
        f"output_dir={output_dir}",
        *options,
        env=env,
    )
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    return job_id, output_dir / f"slurm-{job_id}.out"


@pytest.fixture(scope="module")
def one_process(inputs, tmp_path_factory) -> list[dict]:
    """The reference for step 1: the same recipe, data and global batch in one process, outside Slurm."""
    output_dir = tmp_path_factory.mktemp("one-process")
    proc = run_cli("train", TINY, *COMMON, *inputs, *FOUR_STEPS, f"output_dir={output_dir}", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(output_dir)


def assert_two_node_layout(cluster: MultiNodeCluster, text: str) -> None:
    first = cluster.nodes[0]
    assert f"rendezvous {first.address}:" in text, "MASTER_ADDR is the first node's own address"
    assert "world=4: TP=2 PP=1 CP=1 DP=2" in text, text[-3000:]
    assert re.search(r"gloo all-reduce over 4 rank\(s\): [\d.]+ GB/s bus bandwidth", text), text[-3000:]


def losses_by_step(output_dir: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (run again after a resume from an older checkpoint) by its last run."""
    return {m["step"]: m["loss"] for m in read_metrics(output_dir)}


def logged_steps(output_dir: Path) -> int:
    metrics = output_dir / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.is_file() else 0


def hostnames(cluster: MultiNodeCluster, nodelist: str) -> list[str]:
    return cluster.run("scontrol", "show", "hostnames", nodelist).stdout.split()


def in_namespace(namespace: str, function, *args):
    """function(*args) in a thread that has joined the network namespace (setns is per thread)."""
    result: list = []

    def target() -> None:
        with open(f"/run/netns/{namespace}") as handle:
            os.setns(handle.fileno(), os.CLONE_NEWNET)
        result.append(function(*args))

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=30)
    return result[0]


def test_interface_towards_picks_the_interface_that_routes_to_the_host():
    assert interface_towards("127.0.0.1") == "lo"
    # no address, no route: gloo is left to its own choice rather than given a wrong interface
    assert interface_towards("not a host name") is None


@pytest.mark.slow
def test_interface_towards_on_a_node_is_its_link_to_the_other_nodes(multinode):
    kn1, kn2 = multinode.nodes[:2]
    assert in_namespace(kn1.namespace, interface_towards, kn2.address) == kn1.interface
    # its own address routes over lo, but the address is the veth's, which the others can reach
    assert in_namespace(kn1.namespace, interface_towards, kn1.address) == kn1.interface
    assert in_namespace(kn1.namespace, interface_towards, "127.0.0.1") == "lo"


@pytest.fixture(scope="module")
def straight_run(multinode, inputs, tmp_path_factory) -> tuple[Path, dict[str, str], str]:
    """The uninterrupted two-node run (srun launcher) that the other runs are compared with."""
    output_dir = tmp_path_factory.mktemp("straight")
    start = time.monotonic()
    job_id, log = submit(multinode, inputs, output_dir, *STRAIGHT)
    info = multinode.wait(job_id, finished, timeout=400, log=log)
    print(f"\nstraight 2-node run, {STRAIGHT_STEPS} steps: {time.monotonic() - start:.0f} s")
    return output_dir, info, log.read_text()


@pytest.mark.slow
def test_srun_two_nodes_dp2_tp2_first_step_loss_equals_one_process(multinode, straight_run, one_process):
    output_dir, info, text = straight_run
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text[-3000:]
    assert info["NodeList"] == "kn[1-2]"
    assert_two_node_layout(multinode, text)
    # doctor compared what both nodes read: the same tokenizer (node-local copies) and datasets
    assert re.search(r"\[OK  \] same inputs +2 node\(s\) see the same tokenizer and 2 dataset\(s\)", text)
    assert "[slurm] training finished" in text
    metrics = read_metrics(output_dir)
    assert [m["step"] for m in metrics] == list(range(1, STRAIGHT_STEPS + 1))
    assert abs(metrics[0]["loss"] - one_process[0]["loss"]) < 1e-5
    # The job ran the shipped script: its body is train.sbatch's, as in a 64-node rendering.
    submitted = (output_dir / "submit.sbatch").read_text()
    body = script_body(LAUNCHERS["srun"])
    assert submitted.endswith(body.rstrip("\n") + "\n")
    rendered = dry_run_172b_on_64_nodes("srun")
    assert "#SBATCH --nodes=64" in rendered and body.rstrip("\n") in rendered


@pytest.mark.slow
def test_torchrun_two_nodes_dp2_tp2_first_step_loss_equals_one_process(
    multinode, inputs, one_process, tmp_path
):
    start = time.monotonic()
    job_id, log = submit(multinode, inputs, tmp_path, "--launcher", "torchrun", *FOUR_STEPS)
    info = multinode.wait(job_id, finished, timeout=300, log=log)
    text = log.read_text()
    print(f"\ntorchrun: 2 nodes x 2 processes, 4 steps: {time.monotonic() - start:.0f} s")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text[-3000:]
    assert info["NodeList"] == "kn[1-2]"
    assert "2 node(s) x 2 processes" in text
    assert_two_node_layout(multinode, text)
    metrics = read_metrics(tmp_path)
    assert abs(metrics[0]["loss"] - one_process[0]["loss"]) < 1e-5
    assert [m["loss"] for m in metrics] == pytest.approx([m["loss"] for m in one_process], abs=1e-4)
    assert (tmp_path / "submit.sbatch").read_text().endswith(script_body(LAUNCHERS["torchrun"]))
    assert script_body(LAUNCHERS["torchrun"]).rstrip("\n") in dry_run_172b_on_64_nodes("torchrun")


@pytest.mark.slow
def test_warning_signal_requeue_resumes_on_other_nodes_to_the_same_losses(
    multinode, inputs, straight_run, tmp_path
):
    """A time-limited job (--signal-before) gets its warning signal while it trains on kn[1-2]; kn1 is
    drained before the requeue, so the second allocation is kn[2-3]: kn2, which held ranks 2-3, now
    holds ranks 0-1 and the rendezvous moves to its address.

    The signal is sent with `scancel --signal=USR1`, which Slurm delivers exactly as it delivers
    --signal=USR1@N at the time limit (to every task of every step, on every node); waiting for
    slurmctld's time-limit check (every 30 s) instead would need a reference run several times longer.
    tests/test_slurm.py proves the time-limit path itself."""
    start = time.monotonic()
    job_id, log = submit(multinode, inputs, tmp_path, "--signal-before", "60", *STRAIGHT)
    info = multinode.wait(job_id, lambda _: logged_steps(tmp_path) >= 3, timeout=240, log=log)
    assert hostnames(multinode, info["NodeList"]) == ["kn1", "kn2"]
    try:
        multinode.update_node("kn1", "State=DRAIN", "Reason=multinode-test:requeue-elsewhere")
        multinode.run("scancel", "--signal=USR1", job_id)
        multinode.wait(job_id, lambda i: int(i.get("Restarts", 0)) >= 1, timeout=120, log=log)
        requeued = time.monotonic()
        info = multinode.wait(job_id, finished, timeout=300, log=log)
    finally:
        multinode.update_node("kn1", "State=RESUME")
        multinode.wait_nodes("idle", timeout=60)
    text = log.read_text()
    print(
        f"\nrequeue across nodes: requeued after {requeued - start:.0f} s, done after "
        f"{time.monotonic() - start:.0f} s"
    )
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-3000:]
    assert hostnames(multinode, info["NodeList"]) == ["kn2", "kn3"]
    stopped_at = int(re.search(r"stop signal received: saving at step (\d+)", text).group(1))
    assert 3 <= stopped_at < STRAIGHT_STEPS, "the requeued run must resume before the reference ends"
    assert "[slurm] exit 3: stopped by a signal after saving a checkpoint; requeueing" in text
    kn1, kn2 = multinode.node("kn1").address, multinode.node("kn2").address
    assert re.search(rf"restart 0 .* on kn\[1-2\], rendezvous {re.escape(kn1)}:", text)
    assert re.search(rf"restart 1 .* on kn\[2-3\], rendezvous {re.escape(kn2)}:", text)
    assert re.search(rf"resumed from \S+iter_{stopped_at:07d} at step {stopped_at}", text)
    resumed, reference = read_metrics(tmp_path), read_metrics(straight_run[0])
    assert [m["step"] for m in resumed] == list(range(1, STRAIGHT_STEPS + 1))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in reference]


@pytest.mark.slow
def test_killed_node_ends_the_step_and_the_requeued_job_resumes_from_the_last_checkpoint(
    multinode, inputs, straight_run, tmp_path
):
    """The second node's slurmd and every process of the job on it are killed after the first checkpoint
    (SIGKILL to all of its namespace). The ranks left on kn1 fail at their next collective, well within
    runtime.distributed_timeout_minutes, with the peer's address in the error; slurmctld marks the node
    down after SlurmdTimeout and, the job being --requeue, requeues it itself. The next allocation takes
    the nodes still up (kn1, kn3) and resumes from the newest complete checkpoint, continuing the
    reference losses."""
    timeout_minutes = 1
    options = (*SCHEDULE, f"runtime.distributed_timeout_minutes={timeout_minutes}")
    job_id, log = submit(multinode, inputs, tmp_path, *options)
    latest = tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt"
    info = multinode.wait(job_id, lambda _: latest.is_file(), timeout=240, log=log)
    assert hostnames(multinode, info["NodeList"]) == ["kn1", "kn2"]
    killed_at = time.monotonic()
    killed = multinode.kill_node("kn2")
    try:
        info = multinode.wait(job_id, lambda i: int(i.get("Restarts", 0)) >= 1, timeout=180, log=log)
        requeued = time.monotonic() - killed_at
        saved = int(latest.read_text())
        stop_at = saved + 5
        info = multinode.wait(
            job_id, lambda i: max(losses_by_step(tmp_path)) >= stop_at or finished(i), timeout=300, log=log
        )
        resumed = losses_by_step(tmp_path)
    finally:
        multinode.run("scancel", job_id, check=False)
        multinode.wait(job_id, finished, timeout=60, log=log)
        multinode.start_slurmd("kn2")
        multinode.wait_nodes("idle", timeout=120)
    text = log.read_text()
    print(f"\nkilled kn2 ({len(killed)} processes): requeued after {requeued:.0f} s, resumed from {saved}")
    first, second = text.split(f"[slurm] job {job_id} restart 1 ", 1)
    kn2 = re.escape(multinode.node("kn2").address)
    assert re.search(rf"Connection reset by peer|Connection closed by peer|\[{kn2}\]", first), first[-3000:]
    assert re.search(rf"JOB {job_id} ON kn1 CANCELLED AT \S+ DUE TO NODE FAILURE", first), first[-3000:]
    assert requeued < timeout_minutes * 60 + 30, "the step ended within distributed_timeout_minutes"
    assert saved >= SAVE_INTERVAL and saved % SAVE_INTERVAL == 0
    assert stop_at <= STRAIGHT_STEPS, "the resumed steps must be ones the reference ran"
    assert hostnames(multinode, info["NodeList"]) == ["kn1", "kn3"]
    assert re.search(rf"resumed from \S+iter_{saved:07d} at step {saved}", second), second[-3000:]
    reference = losses_by_step(straight_run[0])
    assert [resumed[step] for step in range(1, stop_at + 1)] == [
        reference[step] for step in range(1, stop_at + 1)
    ]


@pytest.mark.slow
def test_doctor_fails_a_job_whose_nodes_read_different_tokenizers(multinode, inputs, tokenized, tmp_path):
    """data.tokenizer is a node-local copy; kn2's is replaced by another tokenizer. Doctor on rank 0 names
    the node and why, and the job stops before training. (Equal copies: the straight run.)"""
    local_kn2 = multinode.local_folder("kn2") / "tiny.model"
    saved = local_kn2.read_bytes()
    shutil.copyfile(tokenized[2], local_kn2)
    try:
        start = time.monotonic()
        job_id, log = submit(multinode, inputs, tmp_path, "schedule.train_iters=3")
        info = multinode.wait(job_id, finished, timeout=300, log=log)
    finally:
        local_kn2.write_bytes(saved)
    text = log.read_text()
    print(f"\ndoctor across nodes, different tokenizer: {time.monotonic() - start:.0f} s")
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "1:0"), text[-3000:]
    # kn2's own doctor refuses the config (not the datasets' tokenizer); rank 0 prints that for it
    assert re.search(
        r"\[FAIL\] same inputs +kn2 cannot read the run's inputs \(config: data\.tokenizer=\S+ "
        r"\(sha256 \w+\) is not the tokenizer the datasets",
        text,
    ), text[-3000:]
    assert "[slurm] kumihimo doctor found problems (FAIL lines above); not training" in text
    assert "[train]" not in text


@pytest.mark.slow
def test_datatrove_array_tasks_spread_over_nodes_equal_the_local_run(multinode, tmp_path):
    """`kumihimo data curate` with executor.kind=datatrove-slurm: a 3-task array (one CPU each, two CPUs
    a node) cannot fit on one node, so the shards are curated on two or three nodes; the dedup stages'
    jobs (3-task arrays for exact and bands) and the finishing job follow; the output equals the
    single-process local run byte for byte."""
    pytest.importorskip("datatrove")
    from test_data_prep_pipeline import differing_outputs

    from tests.test_data_prep_slurm import _curate_command, _wait_for_the_jobs, local_reference

    config_path, reference = local_reference(tmp_path)
    out, logs = tmp_path / "out", tmp_path / "datatrove"
    start = time.monotonic()
    submitted = multinode.run(*_curate_command(config_path, out, logs))
    assert "Slurm jobs submitted" in submitted.stderr, submitted.stderr[-2000:]
    _wait_for_the_jobs(multinode, logs)
    job_ids = json.loads((logs / "slurm_jobs.json").read_text())
    # curate, then every dedup stage (the label rounds one job that runs them until settled), finish
    from kumihimo.data_prep import dedup_stages

    assert len(job_ids) == 1 + len(dedup_stages.STAGES) + 1, job_ids
    records = multinode.jobs()
    array = [r for r in records if r.get("ArrayJobId") == job_ids[0]]
    later = [r for r in records if r.get("ArrayJobId") in job_ids[1:]]
    nodes = sorted({r["NodeList"] for r in array})
    print(f"\ndatatrove-slurm across nodes: {time.monotonic() - start:.0f} s; array tasks on {nodes}")
    # exact, alive, bands, labels, decide, sizes, cluster, finish
    assert len(later) == 3 + 1 + 3 + 1 + 3 + 3 + 1 + 1
    assert {(r["JobState"], r["ExitCode"]) for r in [*array, *later]} == {("COMPLETED", "0:0")}
    assert len(array) == 3 and len(nodes) >= 2, nodes
    assert differing_outputs(out, reference) == []


@pytest.mark.slow
def test_a_stopped_rank_on_the_second_node_is_named_and_the_job_requeued(multinode, inputs, tmp_path):
    """Rank 2 (the first of kn2) stops itself with SIGSTOP at step 4 (KUMIHIMO_FAULT, which sbatch
    exports to the job); its watchdog on kn2 names it with its host and stacks and the job's ranks exit 5,
    which train.sbatch requeues. The requeued allocation resumes (tests/test_pretrain_hangs.py checks the
    losses of such a resume on one machine); here the job is cancelled once requeued."""
    options = (
        "schedule.train_iters=300",
        "checkpoint.save_interval=2",
        "resilience.hang_timeout_floor_s=10",
        "resilience.hang_initial_timeout_s=120",
    )
    job_id, log = submit(
        multinode, inputs, tmp_path, *options, env=dict(multinode.env, KUMIHIMO_FAULT="stop:2:4")
    )
    start = time.monotonic()
    try:
        multinode.wait(
            job_id, lambda _: "[slurm] exit 5" in (log.read_text() if log.is_file() else ""), 400, log
        )
    finally:
        multinode.run("scancel", job_id, check=False)
        multinode.wait(job_id, finished, timeout=60, log=log)
    text = log.read_text()
    print(f"\nstopped rank on kn2: job ended for requeue {time.monotonic() - start:.0f} s after submission")
    report = text[text.find("[watchdog]") :][:6000]
    stuck = re.search(r"\[watchdog\] rank 2 on kn2 \(pid \d+\) is stuck: step 4 has run ([\d.]+) s", text)
    assert stuck, text[-4000:]
    assert "the process is stopped (SIGSTOP or a frozen node)" in report, report
    # the stacks follow the stuck line, perhaps after other ranks' tracebacks: look in the whole log
    stacks = text.split("[watchdog] Python stacks of rank 2", 1)
    assert len(stacks) == 2 and "in inject" in stacks[1][:6000], report
    assert "[slurm] exit 5: a rank hung (the [watchdog] line above names it); requeueing" in text
    # rank 0 read the job's end (--time 00:10:00) from Slurm and will stop 2 minutes before it
    assert re.search(
        rf"\[train\] deadline: saving and exiting for requeue before \S+ \S+ \(the end of Slurm job {job_id}\)",
        text,
    ), text[:6000]
