"""benchmarks/run.py (sweeps on a process pool or Ray) and benchmarks/report.py (CSV, curves, table), driven
through their command lines on the cheapest configuration of mbrl_mpc.py."""
import csv
import fcntl
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

RUN = os.path.join(ROOT, "benchmarks", "run.py")
REPORT = os.path.join(ROOT, "benchmarks", "report.py")
TINY_FLAGS = ("--total-timesteps 60 --trial-length 20 --init-random-episodes 2 --ensemble-size 2 --hidden-size 16 "
              "--num-hidden-layers 2 --population-size 16 --num-elites 4 --cem-iterations 2 --horizon 5 "
              "--num-particles 2 --eval-episodes 1 --checkpoint-every 1 --device cpu")


def write_config(path, env_ids: list[str], seeds: list[int], extra: str = "") -> str:
    path.write_text(f'script = "mbrl_mpc.py"\n[experiments.tiny]\nenv_ids = {json.dumps(env_ids)}\n'
                    f'seeds = {json.dumps(seeds)}\nflags = "{TINY_FLAGS}"\nmetric = "charts/episodic_return"\n'
                    f'table_steps = [30, 50]\n{extra}')
    return str(path)


def sweep(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, RUN, "--sweeps-dir", str(tmp_path / "sweeps"), *flags], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)


def job(tmp_path, name: str, key: str) -> dict:
    with open(tmp_path / "sweeps" / name / key / "job.json") as f:
        return json.load(f)


def files_with_mtimes(folder) -> dict[str, int]:
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(folder) for f in fs}


def test_dry_run_expands_the_sweep_into_exactly_these_commands(tmp_path):
    extra = 'variants = ["", "--horizon 7"]\n[experiments.tiny.env_flags]\n"HalfCheetah-v5" = "--eval-episodes 0"\n'
    config = write_config(tmp_path / "c.toml", ["InvertedPendulum-v5", "HalfCheetah-v5"], [9], extra)
    out = sweep(tmp_path, "--config", config, "--experiment", "tiny", "--seeds", "1", "2", "--dry-run")
    assert out.returncode == 0, out.stderr
    folder, script = tmp_path / "sweeps" / "c-tiny", os.path.join(ROOT, "mbrl_mpc.py")

    def line(key, env, seed, tail=""):
        return (f"[start] cd {folder / key} && python {script} --env-id {env} --seed {seed} --exp-name c-tiny "
                f"{TINY_FLAGS}{tail}")
    assert out.stdout.splitlines() == [
        line("mbrl_mpc__InvertedPendulum-v5__s1", "InvertedPendulum-v5", 1),
        line("mbrl_mpc__InvertedPendulum-v5__s2", "InvertedPendulum-v5", 2),
        line("mbrl_mpc__InvertedPendulum-v5__horizon-7__s1", "InvertedPendulum-v5", 1, " --horizon 7"),
        line("mbrl_mpc__InvertedPendulum-v5__horizon-7__s2", "InvertedPendulum-v5", 2, " --horizon 7"),
        line("mbrl_mpc__HalfCheetah-v5__s1", "HalfCheetah-v5", 1, " --eval-episodes 0"),
        line("mbrl_mpc__HalfCheetah-v5__s2", "HalfCheetah-v5", 2, " --eval-episodes 0"),
        line("mbrl_mpc__HalfCheetah-v5__horizon-7__s1", "HalfCheetah-v5", 1, " --eval-episodes 0 --horizon 7"),
        line("mbrl_mpc__HalfCheetah-v5__horizon-7__s2", "HalfCheetah-v5", 2, " --eval-episodes 0 --horizon 7"),
    ]
    assert not (tmp_path / "sweeps").exists()  # a dry run starts nothing and writes nothing


def test_task_families_are_passed_as_task(tmp_path):
    config = os.path.join(ROOT, "benchmarks", "configs", "rl2_recurrent.toml")
    out = sweep(tmp_path, "--config", config, "--experiment", "paper", "--seeds", "4", "--dry-run")
    folder, script = tmp_path / "sweeps" / "rl2_recurrent-paper", os.path.join(ROOT, "rl2_recurrent.py")
    assert out.stdout.splitlines() == [
        f"[start] cd {folder / f'rl2_recurrent__{task}__s4'} && python {script} --task {task} --seed 4 "
        "--exp-name rl2_recurrent-paper" for task in ["HalfCheetahVel", "HalfCheetahDir"]]


@pytest.mark.parametrize("flags, message", [
    (["--experiment", "nope"], "has no experiment 'nope'; pass --experiment with one of: tiny"),
    (["--experiment", "tiny", "--scripts", "nope.py"], "no script nope.py"),
    (["--experiment", "tiny", "--max-parallel", "0"], "--max-parallel and --threads-per-run must be at least 1"),
])
def test_bad_sweep_is_one_clear_line(tmp_path, flags, message):
    out = sweep(tmp_path, "--config", write_config(tmp_path / "c.toml", ["InvertedPendulum-v5"], [1]), *flags)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_local_sweep_survives_a_failing_run_reports_and_skips_or_resumes_on_rerun(tmp_path):
    # CartPole-v1 (discrete actions) is the deliberately failing run: the script refuses it at once
    per_env_steps = '[experiments.tiny.env_table_steps]\n"InvertedPendulum-v5" = [30, 45, 50]\n'
    config = write_config(tmp_path / "c.toml", ["InvertedPendulum-v5", "CartPole-v1"], [1, 2], per_env_steps)
    out = sweep(tmp_path, "--config", config, "--experiment", "tiny", "--max-parallel", "2")
    assert out.returncode == 1
    assert "FAILED mbrl_mpc__CartPole-v1__s1" in out.stdout and "FAILED mbrl_mpc__CartPole-v1__s2" in out.stdout
    assert "CartPole-v1 has Discrete actions" in out.stdout  # the failed run's log tail
    assert "2 of 4 runs finished" in out.stdout
    for seed in [1, 2]:
        record = job(tmp_path, "c-tiny", f"mbrl_mpc__InvertedPendulum-v5__s{seed}")
        assert record["status"] == "finished" and record["attempts"] == 1
        assert record["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)  # cores / --max-parallel

    # report: tidy CSV, one figure per env with data, the table's rows = runs' groups x the env's table steps
    published = tmp_path / "published.csv"
    published.write_text("script,env,step,metric,value,source\n"
                         "mbrl_mpc,InvertedPendulum-v5,50,charts/episodic_return,7.5,a test source\n")
    report_dir = tmp_path / "report"
    out = subprocess.run([sys.executable, REPORT, str(tmp_path / "sweeps" / "c-tiny"), "--published", str(published),
                          "--out", str(report_dir)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    with open(report_dir / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["env"], r["seed"]) for r in rows} == {("InvertedPendulum-v5", "1"), ("InvertedPendulum-v5", "2")}
    assert all(r["metric"] == "charts/episodic_return" and r["hardware"] and r["status"] == "finished" for r in rows)
    assert sorted(os.listdir(report_dir)) == ["InvertedPendulum-v5.png", "curves.csv", "table.md"]
    table = (report_dir / "table.md").read_text()
    table_rows = [line for line in table.splitlines() if line.startswith("| mbrl_mpc")]
    assert len(table_rows) == 3 and all("(2) |" in line for line in table_rows)
    assert "| 50 |" in table_rows[2] and "| 7.5 | a test source |" in table_rows[2]
    assert "no data: c-tiny/mbrl_mpc__CartPole-v1__s1 (failed" in table
    # several metrics: a figure per env and metric, every metric's rows in the CSV, one table each; runs that
    # wrote an adaptation curve (context_ars_bo.py's adaptation.json) get its CSV, figure and mean +- std row
    for seed, best in [(1, [1.0, 2.0, 3.0]), (2, [3.0, 4.0, 5.0])]:
        run_dir = job(tmp_path, "c-tiny", f"mbrl_mpc__InvertedPendulum-v5__s{seed}")["run_dir"]
        with open(os.path.join(run_dir, "adaptation.json"), "w") as f:
            json.dump({"step": 60, "episodes": [3, 6, 9], "best_return": best}, f)
    out = subprocess.run([sys.executable, REPORT, str(tmp_path / "sweeps" / "c-tiny"), "--metric",
                          "charts/episodic_return", "eval/return", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(tmp_path / "two")) == [
        "InvertedPendulum-v5__charts-episodic_return.png", "InvertedPendulum-v5__eval-return.png", "adaptation.csv",
        "adaptation__InvertedPendulum-v5.png", "curves.csv", "table.md"]
    with open(tmp_path / "two" / "adaptation.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert ("| mbrl_mpc | InvertedPendulum-v5 | 1 (60), 2 (60) | 3: 2.00 ± 1.00, 6: 3.00 ± 1.00, 9: 4.00 ± 1.00 |"
            in (tmp_path / "two" / "table.md").read_text())
    with open(tmp_path / "two" / "curves.csv") as f:
        assert {r["metric"] for r in csv.DictReader(f)} == {"charts/episodic_return", "eval/return"}
    tables = [line for line in (tmp_path / "two" / "table.md").read_text().splitlines() if line.startswith("| run")]
    assert len(tables) == 2 and "`eval/return`" in tables[1]
    # --final: each run's last logged value (runs budgeted in iterations end at different steps)
    out = subprocess.run([sys.executable, REPORT, str(tmp_path / "sweeps" / "c-tiny"), "--final", "--out",
                          str(tmp_path / "final")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    last = {}
    for r in rows:  # the first report's curves.csv rows, in logged order
        last[r["seed"]] = (r["step"], float(r["value"]))
    row = next(line for line in (tmp_path / "final" / "table.md").read_text().splitlines()
               if line.startswith("| mbrl_mpc | InvertedPendulum-v5 |"))
    steps, mean_std, per_seed = [cell.strip() for cell in row.split("|")[3:6]]
    values = [last["1"][1], last["2"][1]]
    assert steps == f"{last['1'][0]}, {last['2'][0]}" and mean_std.endswith("(2)")
    mean, std = (float(x) for x in mean_std[:-len("(2)")].split("±"))
    assert mean == pytest.approx(np.mean(values), abs=0.06) and std == pytest.approx(np.std(values), abs=0.06)
    assert [float(x) for x in per_seed.split(",")] == pytest.approx(values, abs=0.06)  # 2 or 1 decimals shown

    def again_without_cartpole(*flags: str) -> subprocess.CompletedProcess:
        return sweep(tmp_path, "--config", config, "--experiment", "tiny", "--env-ids", "InvertedPendulum-v5", *flags)

    # the same sweep without the failing env: everything is finished, nothing starts or changes
    key = "mbrl_mpc__InvertedPendulum-v5__s1"
    before = files_with_mtimes(tmp_path / "sweeps" / "c-tiny")
    again = again_without_cartpole()
    assert again.returncode == 0 and "2 already finished, 0 to run" in again.stdout
    after = files_with_mtimes(tmp_path / "sweeps" / "c-tiny")
    assert {k: v for k, v in after.items() if not k.endswith("sweep.json")} == \
        {k: v for k, v in before.items() if not k.endswith("sweep.json")}

    # seed 1 as if the machine died after its last checkpoint: the rerun resumes it and skips seed 2
    record = job(tmp_path, "c-tiny", key)
    (tmp_path / "sweeps" / "c-tiny" / key / "job.json").write_text(json.dumps({**record, "status": "running"}))
    plan = again_without_cartpole("--dry-run").stdout.splitlines()
    assert plan[0].startswith("[resume]") and plan[0].endswith("mbrl_mpc.pt") and plan[1].startswith("[skip]")
    resumed = again_without_cartpole()
    assert resumed.returncode == 0 and "finished mbrl_mpc__InvertedPendulum-v5__s1 (resumed" in resumed.stdout
    record = job(tmp_path, "c-tiny", key)
    assert record["attempts"] == 2 and "--resume" in record["last_command"]
    assert os.path.dirname(record["last_command"][-1]) == record["run_dir"]  # continued in its own folder
    assert "resumed" in (tmp_path / "sweeps" / "c-tiny" / key / "log.txt").read_text()
    assert len(os.listdir(tmp_path / "sweeps" / "c-tiny" / key / "runs")) == 1  # one run folder, continued

    # a run that another process is running (its folder's lock is held) is left alone, not started twice
    (tmp_path / "sweeps" / "c-tiny" / key / "job.json").write_text(json.dumps({**record, "status": "running"}))
    with open(tmp_path / "sweeps" / "c-tiny" / key / "lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        plan = again_without_cartpole("--dry-run").stdout.splitlines()
        assert plan[0].startswith("[busy]")
        busy = again_without_cartpole()
        assert busy.returncode == 0 and f"1 running elsewhere ({key}), 0 to run" in busy.stdout
    assert job(tmp_path, "c-tiny", key)["attempts"] == 2

    # the same folder with another command would mix two configurations in one curve: refused
    changed = again_without_cartpole("--flags=" + TINY_FLAGS.replace("--horizon 5", "--horizon 6"))
    assert changed.returncode != 0 and "holds a run started with another command" in changed.stderr


def test_ray_backend_runs_the_same_tiny_sweep(tmp_path):
    pytest.importorskip("ray", reason="ray is an optional extra (.ci/run installs it); pip install ray")
    config = write_config(tmp_path / "c.toml", ["InvertedPendulum-v5"], [1, 2])
    out = sweep(tmp_path, "--config", config, "--experiment", "tiny", "--backend", "ray", "--cpus-per-run", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 of 2 runs finished" in out.stdout
    for seed in [1, 2]:
        record = job(tmp_path, "c-tiny", f"mbrl_mpc__InvertedPendulum-v5__s{seed}")
        assert record["status"] == "finished" and record["threads"] == 1
        run_dirs = os.listdir(tmp_path / "sweeps" / "c-tiny" / record["key"] / "runs")
        assert len(run_dirs) == 1 and run_dirs[0].startswith(f"InvertedPendulum-v5__c-tiny__{seed}__")
