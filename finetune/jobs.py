"""The study's jobs, submitted through submitit: on this machine (`local`: each job a subprocess), on a Slurm
cluster (`slurm`), or in the study's own process (`debug`). A job is a list of commands (the suite's entry scripts)
run one after another; it writes its output into its log file and fails with the tail of that log."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune.config.study import RunConfig
from finetune.errors import FinetuneError

log = logging.getLogger(__name__)


class JobError(FinetuneError):
    """A job of the study failed; its log names what went wrong."""


@dataclass
class Job:
    name: str
    commands: list[list[str]]
    log_file: Path
    done: Path
    """The file whose presence means the job has finished (a metrics file): a finished job is never run again."""
    after: list[str] = field(default_factory=list)
    """Names of jobs that must finish first."""


def run_commands(commands: list[list[str]], log_file: str, cwd: str, threads: int | None = None) -> None:
    """A job's body (top level, so submitit can pickle it): each command in turn, output appended to the log;
    `threads` caps torch's CPU threads (OMP_NUM_THREADS)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1") | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    for command in commands:
        with open(log_file, "a", encoding="utf-8") as out:
            out.write(f"\n$ {' '.join(command)}\n")
            out.flush()
            code = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        if code != 0:
            tail = Path(log_file).read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
            raise JobError(f"`{' '.join(command[-3:])}` exited with {code}; the end of {log_file}:\n" + "\n".join(tail))


class _Ran:
    """A job run to its end in this process, with the face of a submitit job."""

    def __init__(self, job: Job, cwd: Path, threads: int | None):
        self.error = None
        try:
            run_commands(job.commands, str(job.log_file), str(cwd), threads)
        except JobError as e:
            self.error = e

    def done(self) -> bool:
        return True

    def result(self) -> None:
        if self.error is not None:
            raise self.error

    def cancel(self, check: bool = False) -> None:
        pass


def executor(cfg: RunConfig, folder: Path):
    import submitit

    ex = submitit.AutoExecutor(folder=str(folder), cluster=cfg.executor)
    params = {"timeout_min": cfg.slurm.timeout_min, "name": "finetune-study"}
    if cfg.executor == "slurm":
        params |= {
            "gpus_per_node": cfg.slurm.gpus_per_node,
            "cpus_per_task": cfg.slurm.cpus_per_task,
            "mem_gb": cfg.slurm.mem_gb,
            "slurm_partition": cfg.slurm.partition,
            "slurm_account": cfg.slurm.account,
            "slurm_additional_parameters": dict(cfg.slurm.additional),
        }
        params = {k: v for k, v in params.items() if v is not None}
    ex.update_parameters(**params)
    return ex


def run(jobs: list[Job], cfg: RunConfig, folder: Path, cwd: Path, report=None) -> None:
    """Run every job not yet done, at most cfg.max_parallel at once, each after the jobs it depends on. `report` is
    called with (job, seconds) as each one finishes. The first failure stops the study (finished jobs stay done)."""
    todo = [j for j in jobs if not j.done.exists()]
    finished = {j.name for j in jobs if j.done.exists()}
    if not todo:
        return
    # submitit's DebugExecutor opens pdb on a failure, which would hang a study run without a terminal: `debug`
    # runs the jobs here instead
    ex = None if cfg.executor == "debug" else executor(cfg, folder)
    import torch

    share = cfg.executor == "local" and not torch.cuda.is_available()  # the CPU's cores, among the jobs running
    running: dict[str, tuple[Job, object, float]] = {}
    while todo or running:
        ready = [j for j in todo if all(a in finished for a in j.after)]
        while ready and len(running) < cfg.max_parallel:
            # a job that starts alone (the base, the last cell) gets every core, one of two gets half
            together = min(cfg.max_parallel, len(running) + len(ready))
            threads = max(1, len(os.sched_getaffinity(0)) // together) if share else None
            job = ready.pop(0)
            todo.remove(job)
            log.info("job %s: starting (log: %s)", job.name, job.log_file)
            if ex is None:  # debug: in this process, one job after another
                submitted = _Ran(job, cwd, threads)
            else:
                submitted = ex.submit(run_commands, job.commands, str(job.log_file), str(cwd), threads)
            running[job.name] = (job, submitted, time.perf_counter())
        if not running:
            blocked = ", ".join(f"{j.name} (after {j.after})" for j in todo)
            raise JobError(f"jobs wait for jobs that never run: {blocked}")
        for name, (job, submitted, started) in list(running.items()):
            if not submitted.done():
                continue
            del running[name]
            try:
                submitted.result()
            except Exception as e:
                for _, other, _ in running.values():
                    other.cancel(check=False)
                message = str(e) if isinstance(e, JobError) else f"{type(e).__name__}: {e}"
                raise JobError(f"job {job.name} failed: {message.strip().splitlines()[-1][:2000]}\n{message}") from None
            if not job.done.exists():
                raise JobError(f"job {job.name} ended without writing {job.done}; see {job.log_file}")
            finished.add(name)
            if report is not None:
                report(job, time.perf_counter() - started)
        if running:
            time.sleep(0.5)


def cpu_threads(cfg: RunConfig) -> int | None:
    """Threads for each job on a machine without a GPU: its cores shared by the jobs that run at once (two 1-thread
    trainings on 2 cores did 1.4x the work of one 2-thread training after another: small models leave cores idle
    in Python between kernels)."""
    cores = len(os.sched_getaffinity(0))
    return max(1, cores // cfg.max_parallel) if cfg.executor == "local" else cores


def launcher(cfg: RunConfig) -> list[str]:
    """The command that starts an entry script: study.launcher, with `accelerate` and `python` taken from this
    interpreter's environment and, on a machine without a GPU, the job's share of the CPU cores (accelerate launch
    gives a CPU process one thread unless told)."""
    import torch

    gpu = torch.cuda.is_available()
    default = ["accelerate", "launch", "--num_processes", "1"] if gpu else ["python"]
    command = list(cfg.launcher) if cfg.launcher else default
    if command[0] == "accelerate":
        command[0] = str(Path(sys.executable).with_name("accelerate"))
        if not gpu and "--num_cpu_threads_per_process" not in command:
            command += ["--num_cpu_threads_per_process", str(cpu_threads(cfg))]
    elif command[0] == "python":
        command[0] = sys.executable
    return command
