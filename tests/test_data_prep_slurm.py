"""`kumihimo data curate` with executor.kind=datatrove-slurm on a real one-node Slurm (the `cluster` fixture).

The test corpus of test_data_prep_pipeline.py (~20 shards) is curated by a 3-task array job, then the
dedup stages (3-task arrays for the exact and band key ranges, single jobs for alive and cluster) and
the finishing job, each depending on the one before; the result must equal the single-process local run
byte for byte. The command runs
the venv's Python the way `.venv/bin/kumihimo` runs without activating the venv: the venv is not on PATH,
so the jobs find datatrove's launcher only through the executor's default environment command.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
from test_data_prep_pipeline import differing_outputs, write_corpus

from kumihimo.core import configtree
from kumihimo.data_prep import dedup_stages
from kumihimo.data_prep.pipeline import curate
from tests.slurm_cluster import PARTITION, SlurmCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
JOBS_TIMEOUT_S = 600  # 9 jobs and datatrove's stats job after each: 54 s on this machine (2026-12-06)


def _curate_command(config_path: Path, out: Path, logs: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kumihimo.cli",
        "data",
        "curate",
        str(config_path),
        f"output_dir={out}",
        "executor.kind=datatrove-slurm",
        "executor.tasks=3",
        f"executor.slurm_partition={PARTITION}",
        "executor.slurm_time=00:10:00",
        "executor.slurm_mem_per_cpu_gb=1",
        # the label rounds on a pool of two processes (one where the node has one CPU)
        f"executor.slurm_dedup_cpus={min(2, os.cpu_count() or 1)}",
        f"executor.logging_dir={logs}",
    ]


def _job_logs(logs: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted(logs.rglob("slurm_logs/*.out")))


def _wait_for_the_jobs(cluster: SlurmCluster, logs: Path) -> None:
    """Until the queue is empty; fails at once when a job can never start (a job it depends on failed)."""
    deadline = time.monotonic() + JOBS_TIMEOUT_S
    while queue := cluster.run("squeue", "-h", "-o", "%i %j %T %r").stdout.strip():
        if "DependencyNeverSatisfied" in queue or time.monotonic() > deadline:
            pytest.fail(f"Slurm jobs not done after {JOBS_TIMEOUT_S} s or stuck:\n{queue}\n{_job_logs(logs)}")
        time.sleep(1)


def local_reference(tmp_path: Path) -> tuple[Path, Path]:
    """The test corpus curated locally in one process (the output a Slurm run must equal) and its
    config saved for `kumihimo data curate`; returns (config path, reference output folder)."""
    config = write_corpus(tmp_path / "corpus")
    reference = tmp_path / "reference"
    config.output_dir = str(reference)
    curate(config)
    config_path = tmp_path / "data_prep.yaml"
    configtree.save(config, config_path)
    return config_path, reference


def test_datatrove_slurm_curation_on_a_real_cluster_equals_the_local_run(cluster, tmp_path):
    pytest.importorskip("datatrove")
    config_path, reference = local_reference(tmp_path)
    out, logs = tmp_path / "out", tmp_path / "datatrove"
    venv_bin = str(Path(sys.executable).parent)
    env = dict(
        cluster.env, PATH=os.pathsep.join(p for p in cluster.env["PATH"].split(os.pathsep) if p != venv_bin)
    )
    command = _curate_command(config_path, out, logs)
    start = time.monotonic()
    submitted = cluster.run(*command, env=env)
    assert "Slurm jobs submitted" in submitted.stderr, submitted.stderr[-2000:]
    queue = cluster.run("squeue", "-h", "-o", "%i %j %E").stdout
    job_ids = json.loads((logs / "slurm_jobs.json").read_text())
    # curate, then every dedup stage (the label rounds one job that runs them until settled), finish
    assert len(job_ids) == 1 + len(dedup_stages.STAGES) + 1, job_ids
    curate_id = job_ids[0]
    for before in job_ids[:-1]:
        assert f"afterok:{before}" in queue, queue  # each job waits for the whole job (array) before it
    meanwhile = cluster.run(*command, env=env, check=False)  # a second submission would redo the same shards
    assert meanwhile.returncode == 2 and "still in the Slurm queue" in meanwhile.stderr, meanwhile.stderr[
        -2000:
    ]
    _wait_for_the_jobs(cluster, logs)
    took = time.monotonic() - start
    records = cluster.jobs()
    print(f"\ndatatrove-slurm: {len(records)} jobs done after {took:.0f} s; queue at submission:\n{queue}")
    bad = [
        (r["JobId"], r["JobName"], r["JobState"], r["ExitCode"])
        for r in records
        if (r["JobState"], r["ExitCode"]) != ("COMPLETED", "0:0")
    ]
    assert not bad, f"{bad}\n{_job_logs(logs)}"
    array = [r for r in records if r["ArrayJobId"] == curate_id]
    assert sorted(r["ArrayTaskId"] for r in array) == ["0", "1", "2"]
    names = ["kumihimo-curate", *(f"kumihimo-dedup-{s}" for s in dedup_stages.STAGES), "kumihimo-finish"]
    one_task = ("alive", "labels", "cluster", "finish")
    previous_end = ""
    for job_id, name in zip(job_ids, names, strict=True):
        tasks = [r for r in records if r["ArrayJobId"] == job_id]
        assert {r["JobName"] for r in tasks} == {name}, (job_id, name, tasks)
        assert len(tasks) == (1 if name.rsplit("-", 1)[1] in one_task else 3), (name, tasks)
        assert min(r["StartTime"] for r in tasks) >= previous_end
        previous_end = max(r["EndTime"] for r in tasks)
    assert differing_outputs(out, reference) == []

    # the same command once the jobs have ended: nothing is submitted, the result is read back and printed
    again = cluster.run(*command, env=env)
    assert re.search(r"kept 7 of \d+ input lines", again.stderr), again.stderr[-2000:]
    assert len(cluster.jobs()) == len(records)
