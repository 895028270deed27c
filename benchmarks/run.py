"""Run a sweep -- scripts x env ids (or task families) x seeds x flag variants -- on this machine or on a Ray
cluster. Finished runs are skipped when the sweep is run again; interrupted ones resume from their checkpoint.

  python benchmarks/run.py --config benchmarks/configs/mbrl_ensemble.toml --experiment cpu --dry-run
  python benchmarks/run.py --config benchmarks/configs/mbrl_mpc.toml --experiment cpu --max-parallel 2
  python benchmarks/run.py --scripts mbrl_mpc.py --env-ids InvertedPendulum-v5 --seeds 1 2 3 \
      --flags="--total-timesteps 500" --variants " --horizon 15" " --horizon 30" --name ip-horizon
  python benchmarks/run.py --config ... --backend ray --ray-address auto --cpus-per-run 4 --gpus-per-run 0.25
  python benchmarks/report.py runs/sweeps/<name>        # curves, CSV and the table next to published numbers

Layout of a sweep, runs/sweeps/<name>/:
  sweep.json        the sweep as last run (report.py reads its metric and table steps)
  <job>/job.json    command, status (running / finished / failed), return code, attempts, wall time, hardware,
                    the script's run folder
  <job>/lock        held while the run goes on, so that a second sweep on the same folder leaves it alone
  <job>/log.txt     the script's stdout and stderr, all attempts appended
  <job>/runs/<run_name>/   written by the script itself: TensorBoard events, args.json, checkpoint
A job runs its script with the job folder as working directory, so the script's own runs/ lands there.

On the command line a value that starts with "--" must be attached with "=" (--flags="--x 1") or start with a
space (--variants " --x 1" " --x 2"); otherwise it is read as a flag of run.py itself.

On a Ray cluster every node must see the repository and the sweep folder at the same path (a shared file
system, as on most academic clusters); a run on a node that does not fails with a line that says so.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Literal, Optional

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_KEYS = {"about", "scripts", "script", "env_ids", "tasks", "seeds", "flags", "env_flags", "variants",
              "metric", "table_steps", "env_table_steps"}
"""Keys an experiment of a config file may set (the top level of the file may set any of them as defaults)."""


@dataclass
class Args:
    config: Optional[str] = None
    """TOML file of experiments (benchmarks/configs/<script>.toml); flags given here override its values"""
    experiment: Optional[str] = None
    """which [experiments.<name>] of the config to run (e.g. cpu, paper)"""
    name: Optional[str] = None
    """sweep name: its folder is <sweeps-dir>/<name> (default: <config stem>-<experiment>)"""
    scripts: Optional[list[str]] = None
    """scripts to run, relative to the repository root (e.g. mbrl_mpc.py mbrl_ensemble.py)"""
    env_ids: Optional[list[str]] = None
    """environment ids, passed as --env-id"""
    tasks: Optional[list[str]] = None
    """task families for the meta-RL scripts, passed as --task (instead of env ids)"""
    seeds: Optional[list[int]] = None
    """seeds, passed as --seed"""
    flags: Optional[str] = None
    """flags given to every run, one string (e.g. "--total-timesteps 3000 --device cpu")"""
    variants: Optional[list[str]] = None
    """flag variants, one string each: every env x seed runs once per variant ("" = none)"""
    metric: Optional[str] = None
    """TensorBoard key report.py tabulates (default eval/return)"""
    table_steps: Optional[list[int]] = None
    """env steps at which report.py tabulates the metric"""
    sweeps_dir: str = "runs/sweeps"
    """where sweep folders go"""
    backend: Literal["local", "ray"] = "local"
    """local: a pool of processes on this machine; ray: one Ray task per run (ray is an optional extra)"""
    max_parallel: int = 1
    """local backend: runs at the same time"""
    threads_per_run: Optional[int] = None
    """torch/OpenMP threads of each run (default: local, CPU cores / max-parallel; ray, --cpus-per-run)"""
    ray_address: Optional[str] = None
    """address of an existing Ray cluster ("auto" or host:port); none starts a Ray instance on this machine"""
    cpus_per_run: float = 1.0
    """ray backend: CPUs reserved for each run"""
    gpus_per_run: float = 0.0
    """ray backend: GPUs (or a fraction of one) reserved for each run"""
    dry_run: bool = False
    """print what each run would do (its exact command) and start nothing"""


class SweepError(Exception):
    """A sweep that cannot be run as given; main prints its one-line message."""


@dataclass
class Sweep:
    name: str
    scripts: list[str]
    envs: list[str]
    env_flag: str
    seeds: list[int]
    flags: list[str] = field(default_factory=list)
    env_flags: dict[str, list[str]] = field(default_factory=dict)
    variants: list[str] = field(default_factory=lambda: [""])
    metric: str = "eval/return"
    table_steps: list[int] = field(default_factory=list)
    env_table_steps: dict[str, list[int]] = field(default_factory=dict)
    about: str = ""


# ----------------------------------------------------------------------------------------------------
# Sweep definition: a config file's experiment, overridden by flags, expanded into jobs
# ----------------------------------------------------------------------------------------------------
def load_sweep(args: Args) -> Sweep:
    spec: dict = {}
    if args.config:
        try:
            with open(args.config, "rb") as f:
                config = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise SweepError(f"--config {args.config}: {err}")
        experiments = config.get("experiments", {})
        if args.experiment not in experiments:
            raise SweepError(f"--config {args.config} has no experiment {args.experiment!r}; "
                             f"pass --experiment with one of: {', '.join(experiments) or '(none)'}")
        spec = {k: v for k, v in config.items() if k != "experiments"} | experiments[args.experiment]
        unknown = set(spec) - SWEEP_KEYS
        if unknown:
            raise SweepError(f"--config {args.config}: unknown keys {sorted(unknown)}; known: {sorted(SWEEP_KEYS)}")
        if "script" in spec:
            spec["scripts"] = [spec.pop("script")]
    elif args.experiment:
        raise SweepError("--experiment needs --config (the file that defines it)")
    overrides = {k: getattr(args, k) for k in ["scripts", "env_ids", "tasks", "seeds", "flags", "variants",
                                               "metric", "table_steps"] if getattr(args, k) is not None}
    if "env_ids" in overrides or "tasks" in overrides:  # an env list on the command line replaces the file's
        spec.pop("env_ids", None), spec.pop("tasks", None)
    spec |= overrides
    if bool(spec.get("env_ids")) == bool(spec.get("tasks")):
        raise SweepError("give either env ids (--env-ids) or task families (--tasks), not both and not neither")
    for key in ["scripts", "seeds"]:
        if not spec.get(key):
            raise SweepError(f"the sweep has no {key}: pass --{key} or set {key} in the config's experiment")
    for script in spec["scripts"]:
        if not os.path.isfile(os.path.join(ROOT, script)):
            raise SweepError(f"no script {script} at the repository root {ROOT}")
    default_name = (f"{os.path.splitext(os.path.basename(args.config))[0]}-{args.experiment}" if args.config
                    else "sweep")
    name = args.name or default_name
    if not re.fullmatch(r"[\w.-]+", name):
        raise SweepError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (it names a folder)")
    return Sweep(name=name, scripts=list(spec["scripts"]), envs=list(spec.get("env_ids") or spec["tasks"]),
                 env_flag="--env-id" if spec.get("env_ids") else "--task", seeds=[int(s) for s in spec["seeds"]],
                 flags=shlex.split(spec.get("flags", "")),
                 env_flags={env: shlex.split(f) for env, f in spec.get("env_flags", {}).items()},
                 variants=[shlex.join(shlex.split(v)) for v in spec.get("variants") or [""]],  # " --x 1" = "--x 1"
                 metric=spec.get("metric", "eval/return"), table_steps=[int(s) for s in spec.get("table_steps", [])],
                 env_table_steps={env: [int(s) for s in steps]
                                  for env, steps in spec.get("env_table_steps", {}).items()},
                 about=spec.get("about", ""))


def variant_slug(variant: str) -> str:
    """A folder-safe tag for a flag variant: "--horizon 30" -> "horizon-30" (hashed when long)."""
    slug = re.sub(r"[^\w.]+", "-", variant).strip("-")
    if len(slug) > 40:
        slug = f"{slug[:31]}-{hashlib.sha1(variant.encode()).hexdigest()[:8]}"
    return slug


def expand(sweep: Sweep) -> list[dict]:
    """One job per script x env x variant x seed, in that order. The command starts with "python", which
    each backend replaces by the interpreter it runs under; the script is an absolute path."""
    jobs = []
    for script in sweep.scripts:
        stem = os.path.splitext(os.path.basename(script))[0]
        for env in sweep.envs:
            for variant in sweep.variants:
                for seed in sweep.seeds:
                    key = "__".join([stem, env.replace(":", "-"), *([variant_slug(variant)] if variant else []),
                                     f"s{seed}"])
                    command = ["python", os.path.join(ROOT, script), sweep.env_flag, env, "--seed", str(seed),
                               "--exp-name", sweep.name, *sweep.flags, *sweep.env_flags.get(env, []),
                               *shlex.split(variant)]
                    jobs.append({"key": key, "script": stem, "env": env, "variant": variant, "seed": seed,
                                 "command": command})
    keys = [job["key"] for job in jobs]
    if len(set(keys)) != len(keys):
        raise SweepError("two runs of the sweep share a folder name: make the scripts, envs, seeds and variants "
                         "distinct")
    return jobs


# ----------------------------------------------------------------------------------------------------
# One run: what to do with its folder (skip / resume / start) and running it (on this machine or a Ray node)
# ----------------------------------------------------------------------------------------------------
def read_job(job_dir: str) -> dict:
    try:
        with open(os.path.join(job_dir, "job.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def write_job(job_dir: str, record: dict) -> None:
    tmp = os.path.join(job_dir, "job.json.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, os.path.join(job_dir, "job.json"))


def latest_checkpoint(job_dir: str, script: str) -> Optional[str]:
    runs = os.path.join(job_dir, "runs")
    found = [os.path.join(runs, d, f"{script}.pt") for d in (os.listdir(runs) if os.path.isdir(runs) else [])]
    found = [path for path in found if os.path.isfile(path)]
    return max(found, key=os.path.getmtime) if found else None


def lock_job(job_dir: str) -> Optional[int]:
    """Take the job folder's lock, held while its run goes on (by this sweep or any other process, on any
    node of a shared file system); None when someone else holds it."""
    fd = os.open(os.path.join(job_dir, "lock"), os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def unlock_job(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def plan(job: dict, job_dir: str) -> tuple[str, Optional[str]]:
    """("skip", None) for a finished run, ("resume", checkpoint) for an interrupted or failed one that left a
    checkpoint, ("start", None) otherwise; ("conflict", None) when the folder holds a run of another command
    (continuing it would mix two configurations in one curve), ("busy", None) while another process runs it."""
    if os.path.isfile(os.path.join(job_dir, "lock")):
        fd = lock_job(job_dir)
        if fd is None:
            return "busy", None
        unlock_job(fd)
    return plan_unlocked(job, job_dir)


def plan_unlocked(job: dict, job_dir: str) -> tuple[str, Optional[str]]:
    previous = read_job(job_dir)
    if previous and previous.get("command") != job["command"]:
        return "conflict", None
    if previous.get("status") == "finished":
        return "skip", None
    checkpoint = latest_checkpoint(job_dir, job["script"])
    return ("resume", checkpoint) if checkpoint else ("start", None)


def hardware() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        cpu = platform.processor() or platform.machine()
    gpus = []
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True)
        gpus = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and gpus:  # the GPUs this run may use, not all the node has
        gpus = [gpus[int(i)] for i in visible.split(",") if i.strip().isdigit() and int(i) < len(gpus)]
    return f"{cpu}, {os.cpu_count()} cores" + (f", {', '.join(gpus)}" if gpus else "")


def log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def execute(job: dict, job_dir: str, threads: int) -> dict:
    """Run one job to its end, on whatever machine this function runs; returns its final job.json record."""
    if not os.path.isdir(os.path.dirname(job_dir)):
        return {**job, "status": "failed", "returncode": None, "host": platform.node(),
                "log_tail": f"the sweep folder {os.path.dirname(job_dir)} is not visible on node {platform.node()}:"
                            " Ray cluster runs need a file system shared by all nodes at the same path\n"}
    os.makedirs(job_dir, exist_ok=True)
    lock = lock_job(job_dir)
    if lock is None:  # started by someone else since main planned
        return {**job, "status": "busy", "action": "busy"}
    try:
        return run_job(job, job_dir, threads)
    finally:
        unlock_job(lock)


def run_job(job: dict, job_dir: str, threads: int) -> dict:
    action, checkpoint = plan_unlocked(job, job_dir)
    if action in ("skip", "conflict"):  # the folder changed since main planned: leave it as it is
        return {**read_job(job_dir), "action": action}
    command = [sys.executable if part == "python" else part for part in job["command"]]
    if action == "resume":
        command += ["--resume", checkpoint]
    else:  # a previous attempt without a checkpoint left nothing worth keeping; one run folder per job
        shutil.rmtree(os.path.join(job_dir, "runs"), ignore_errors=True)
    previous = read_job(job_dir)
    record = {**job, "status": "running", "action": action, "started": time.time(), "host": platform.node(),
              "hardware": hardware(), "threads": threads, "attempts": previous.get("attempts", 0) + 1,
              "wall_s": previous.get("wall_s", 0.0), "last_command": command}
    write_job(job_dir, record)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    log_path = os.path.join(job_dir, "log.txt")
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, cwd=job_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:  # Ray runs its workers at nice 15: a run beside other work
            try:                                     # would crawl; back to normal priority where allowed (root)
                os.setpriority(os.PRIO_PROCESS, process.pid, 0)
            except PermissionError:
                pass
        returncode = process.wait()
    run_dirs = glob.glob(os.path.join(job_dir, "runs", "*", "args.json"))  # the script's own run folder
    record.update(status="finished" if returncode == 0 else "failed", returncode=returncode,
                  run_dir=os.path.dirname(max(run_dirs, key=os.path.getmtime)) if run_dirs else None,
                  wall_s=record["wall_s"] + time.time() - record["started"],
                  log_tail="" if returncode == 0 else log_tail(log_path))
    write_job(job_dir, record)
    return record


# ----------------------------------------------------------------------------------------------------
# Backends: both hand each job to `execute` and yield the records as runs end
# ----------------------------------------------------------------------------------------------------
def run_local(jobs: list[tuple[dict, str]], args: Args):
    threads = args.threads_per_run or max(1, len(os.sched_getaffinity(0)) // args.max_parallel)
    pool = ThreadPoolExecutor(args.max_parallel)  # threads that wait on one subprocess each
    try:
        futures = [pool.submit(execute, job, job_dir, threads) for job, job_dir in jobs]
        for future in as_completed(futures):
            yield future.result()
    finally:  # Ctrl-C: start nothing more (the running scripts got the signal too; a re-run resumes them)
        pool.shutdown(wait=True, cancel_futures=True)


def run_ray(jobs: list[tuple[dict, str]], args: Args):
    try:
        import ray
    except ImportError:
        raise SweepError("--backend ray needs Ray: pip install ray (or use --backend local)")
    if args.ray_address:
        ray.init(address=args.ray_address, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    threads = args.threads_per_run or max(1, round(args.cpus_per_run))
    remote = ray.remote(execute).options(num_cpus=args.cpus_per_run, num_gpus=args.gpus_per_run, max_retries=0)
    job_of = {remote.remote(job, job_dir, threads): job for job, job_dir in jobs}
    pending = list(job_of)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                yield ray.get(done[0])
            except Exception as err:  # noqa: BLE001 - a lost node or worker fails this run, not the sweep
                yield {**job_of[done[0]], "status": "failed", "returncode": None, "log_tail": f"Ray: {err}\n"}
    finally:
        ray.shutdown()


def main(args: Args) -> int:
    if args.max_parallel < 1 or (args.threads_per_run is not None and args.threads_per_run < 1):
        raise SweepError("--max-parallel and --threads-per-run must be at least 1")
    if args.cpus_per_run <= 0 or args.gpus_per_run < 0:
        raise SweepError("--cpus-per-run must be > 0 and --gpus-per-run >= 0")
    sweep = load_sweep(args)
    sweep_dir = os.path.abspath(os.path.join(args.sweeps_dir, sweep.name))
    jobs = [(job, os.path.join(sweep_dir, job["key"])) for job in expand(sweep)]
    if args.dry_run:
        for job, job_dir in jobs:
            action, checkpoint = plan(job, job_dir)
            command = job["command"] + (["--resume", checkpoint] if checkpoint else [])
            print(f"[{action}] cd {shlex.quote(job_dir)} && {shlex.join(command)}")
        return 0
    actions = [plan(job, job_dir)[0] for job, job_dir in jobs]
    conflicts = [job_dir for (_, job_dir), action in zip(jobs, actions) if action == "conflict"]
    if conflicts:
        raise SweepError(f"{conflicts[0]} (and {len(conflicts) - 1} more) holds a run started with another command; "
                         "give this sweep another --name, or delete those folders to start them again")
    busy = [job["key"] for (job, _), action in zip(jobs, actions) if action == "busy"]
    todo = [(job, job_dir) for (job, job_dir), action in zip(jobs, actions) if action not in ("skip", "busy")]
    os.makedirs(sweep_dir, exist_ok=True)
    with open(os.path.join(sweep_dir, "sweep.json"), "w") as f:
        json.dump({**sweep.__dict__, "jobs": [job for job, _ in jobs], "config": args.config,
                   "experiment": args.experiment}, f, indent=2)
    print(f"sweep {sweep.name}: {len(jobs)} runs, {len(jobs) - len(todo) - len(busy)} already finished, "
          + (f"{len(busy)} running elsewhere ({', '.join(busy)}), " if busy else "")
          + f"{len(todo)} to run ({args.backend} backend) in {sweep_dir}", flush=True)
    failed = []
    backend = run_local if args.backend == "local" else run_ray
    for count, record in enumerate(backend(todo, args) if todo else [], start=1):
        how = {"resume": "resumed", "start": "started"}.get(record.get("action"), record.get("action", ""))
        if record["status"] == "finished":
            print(f"[{count}/{len(todo)}] finished {record['key']} ({how}, {record.get('wall_s', 0):.0f} s in all)",
                  flush=True)
        elif record["status"] == "busy":
            busy.append(record["key"])
            print(f"[{count}/{len(todo)}] {record['key']} was started by another process meanwhile: left to it")
        else:
            failed.append(record)
            tail = "".join(f"    {line}\n" for line in record.get("log_tail", "").splitlines())
            print(f"[{count}/{len(todo)}] FAILED {record['key']} (exit code {record.get('returncode')}), "
                  f"log {os.path.join(sweep_dir, record['key'], 'log.txt')}:\n{tail}", end="", flush=True)
    print(f"sweep {sweep.name}: {len(jobs) - len(failed) - len(busy)} of {len(jobs)} runs finished"
          + (f"; running elsewhere: {', '.join(busy)}" if busy else "")
          + (f"; failed: {', '.join(r['key'] for r in failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main(tyro.cli(Args)))
    except SweepError as err:
        sys.exit(f"error: {err}")
