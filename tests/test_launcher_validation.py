"""Launcher input that is refused before anything is written (exit 2, one message), and what a job carries."""

from __future__ import annotations

import pytest

from harness.cli import main

BASE = ["--suite", "smoke", "--model", "tiny-llama", "--no-progress", "--no-report"]


@pytest.mark.parametrize("launcher", ["ray", "slurm"])
@pytest.mark.parametrize("command", ["run", "validate"])
def test_a_parallel_launcher_with_the_sqlite_store_is_refused_saying_how_to_start_a_server(
    tmp_path, capsys, launcher, command
):
    results = tmp_path / "r"
    args = [command, *BASE, "--results-dir", str(results), "--launcher", launcher]
    if command == "validate":
        args = [a for a in args if a not in ("--no-progress", "--no-report")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--launcher {launcher}" in err and "sqlite" in err
    assert "harness tracking-server" in err and "make tracking-server" in err and "--tracking-uri" in err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert not results.exists(), "nothing may be written"


def test_an_explicit_sqlite_uri_is_refused_too(tmp_path, capsys):
    db = tmp_path / "store.db"
    assert (
        main(
            [
                "run",
                *BASE,
                "--results-dir",
                str(tmp_path / "r"),
                "--launcher",
                "ray",
                "--tracking-uri",
                f"sqlite:///{db}",
            ]
        )
        == 2
    )
    assert "harness tracking-server" in capsys.readouterr().err
    assert not db.exists() and not (tmp_path / "r").exists()


def test_the_local_launcher_keeps_the_sqlite_store(tmp_path, capsys):
    assert main(["validate", "--suite", "smoke", "--model", "tiny-llama", "--results-dir", str(tmp_path / "r")]) == 0
    assert "sqlite:///" in capsys.readouterr().out


def test_slurm_takes_whole_gpus(tmp_path, capsys):
    assert (
        main(
            [
                "validate",
                "--suite",
                "smoke",
                "--model",
                "tiny-llama",
                "--results-dir",
                str(tmp_path / "r"),
                "--launcher",
                "slurm",
                "--tracking-uri",
                "http://127.0.0.1:9",
                "--job-gpus",
                "0.5",
            ]
        )
        == 2
    )
    assert "whole GPUs" in capsys.readouterr().err


def test_merge_on_a_parallel_launcher_is_refused(tmp_path, capsys):
    assert (
        main(
            [
                "merge",
                *BASE,
                "--results-dir",
                str(tmp_path / "r"),
                "--launcher",
                "ray",
                "--tracking-uri",
                "http://127.0.0.1:9",
            ]
        )
        == 2
    )
    assert "--launcher local" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_job_payload_is_plain_data_with_absolute_paths_and_the_environment_to_forward_is_selected(
    tmp_path, monkeypatch
):
    import pickle

    from harness.config_loading import load_config
    from harness.launchers.job import forwarded_environment, payload

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HARNESS_CACHE_DIR", "/some/cache")
    cfg = load_config(None, {"suite": "smoke", "model": "tiny-llama", "results_dir": "rel", "methods": ["lora"]})
    p = payload(cfg, tmp_path / "rel" / "e" / "lora" / "seed-0", attempt=2, label="lora/seed-0/order-0", log=None)
    assert pickle.loads(pickle.dumps(p)) == p
    assert p["config"]["results_dir"] == str(tmp_path / "rel") and p["cwd"] == str(tmp_path)
    assert "/some/cache" not in repr(p), (
        "the environment travels with the process, not in the payload (submitit keeps it as a file)"
    )
    assert "olora" not in p["config"]  # sections of methods not in the run stay out (they would not validate)
    env = forwarded_environment(
        {"HF_HUB_OFFLINE": "1", "PATH": "/bin", "MLFLOW_TRACKING_TOKEN": "t", "UNRELATED_SECRET": "x"}
    )
    assert env == {"HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_TOKEN": "t"}


class _Cluster:
    """A backend whose every job ends as `outcome` once: the driver's retry policy without a cluster."""

    def __init__(self, outcome):
        self.outcome, self.submitted, self.cancelled = outcome, [], []

    def describe(self):
        return "test cluster"

    def submit(self, payloads):
        self.submitted += payloads
        return [len(self.submitted) - len(payloads) + i for i in range(len(payloads))]

    def poll(self, handles):
        return [(h, *self.outcome) for h in handles]

    def cancel(self, handles):
        self.cancelled += handles

    def log_of(self, handle):
        return f"job-{handle}.log"

    def close(self):
        pass


def _follow_with(outcome, tmp_path, retries=2):
    from harness.config_loading import load_config
    from harness.launchers import driver
    from harness.run.planning import plan
    from harness.suites import load_suite

    cfg = load_config(
        None,
        {
            "suite": "smoke",
            "model": "tiny-llama",
            "methods": ["lora"],
            "results_dir": str(tmp_path),
            "launcher": "ray",
            "job_retries": retries,
        },
    )
    cluster = _Cluster(outcome)
    with pytest.raises(driver.JobsFailed) as err:
        driver._follow(cfg, cluster, tracker=None, specs=plan(cfg, load_suite("smoke")), progress=False)
    return cluster, err.value


def test_a_job_that_keeps_dying_is_retried_job_retries_times_then_reported(tmp_path, monkeypatch):
    from harness.launchers import driver

    monkeypatch.setattr(driver, "POLL_S", 0)
    cluster, err = _follow_with(("died", "WorkerCrashedError"), tmp_path, retries=2)
    assert [p["attempt"] for p in cluster.submitted] == [1, 2, 3]
    assert err.exit_code == 1 and "died (attempt 3)" in str(err) and "job-2.log" in str(err)


def test_a_job_refused_on_bad_input_is_not_retried_and_exits_2(tmp_path, monkeypatch):
    from harness.launchers import driver

    monkeypatch.setattr(driver, "POLL_S", 0)
    cluster, err = _follow_with(("ok", {"ok": False, "error": "folder held by pid 7"}), tmp_path)
    assert [p["attempt"] for p in cluster.submitted] == [1]
    assert err.exit_code == 2 and "folder held by pid 7" in str(err)
