"""What `aeforge run` shows while a job runs (services/run_display.py), and `run --set`.

The display is fed a log the way Ray writes it (each progress line twice, behind Ray's coloured "(pid=...)"
prefixes, among Ray's and MLflow's own lines); the capture of the process's output into the run's log is checked
in a subprocess (real file descriptors, a child process writing to its inherited stderr); the command end to end
with `aeforge run --local`, and on Ray (a subprocess joined to the tests' Ray cluster).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from services.run_display import RunDisplay, Track, format_duration, notice_of
from workers.protocol import progress_line, trial_line

REPO = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[")
STEP_LINE = re.compile(r"^step (\d+)/(\d+)  ")

runner = CliRunner()


def ray_prefixed(line: str, who: str = "RayTrainWorker pid=4242") -> str:
    return f"\x1b[36m({who})\x1b[0m {line}"


RAY_NOISE = [
    "2026-11-30 00:14:42,812\tINFO worker.py:2029 -- Started a local Ray instance. View the dashboard at "
    "\x1b[1m\x1b[32mhttp://127.0.0.1:8265 \x1b[39m\x1b[22m",
    "2026/11/30 00:14:45 INFO mlflow.store.db.utils: Creating initial MLflow database tables...",
    ray_prefixed("Requesting resources: {'CPU': 1.0} * 1", "TrainController pid=12540"),
    ray_prefixed(
        "Reporting training result 1: TrainingReport(checkpoint=Checkpoint(filesystem=local, path=/x), "
        "metrics={'train/loss': 2836.6}, validation=False) from rank 0"
    ),
    "Traceback (most recent call last):",
    '  File "ray/util/placement_group.py", line 1, in PlacementGroupCleaner',
]


def train_log(total: int = 30, every: int = 10) -> list[str]:
    """A train job's log as Ray writes it: noise, then each log point twice, a note once per worker."""
    lines = RAY_NOISE[:3] + [ray_prefixed("aeforge: resuming from /ckpt/step_0 (step 0)")] * 2
    for step in range(every, total + 1, every):
        line = progress_line(
            step,
            total,
            metrics={"train/loss": 100.0 / step, "train/recon": 90.0 / step, "train/kl": 10.0 / step},
            images_per_second=512.0,
        )
        lines += [ray_prefixed(line), ray_prefixed(line)]
    return lines + RAY_NOISE[3:]


def plain_display(**kwargs) -> tuple[RunDisplay, io.StringIO]:
    out = io.StringIO()
    return RunDisplay(Console(file=out, force_terminal=False, width=80), **kwargs), out


# --- the display ------------------------------------------------------------------------------------------------


def test_piped_output_is_one_plain_line_per_log_point_and_no_protocol_or_ray_lines():
    clock = iter(range(100))
    display, out = plain_display(clock=lambda: float(next(clock)))
    for line in train_log():
        display.feed(line)
    lines = out.getvalue().splitlines()
    assert lines == [
        "note: resuming from /ckpt/step_0 (step 0)",
        "step 10/30  loss 10  recon 9  kl 1  512 img/s",
        "step 20/30  loss 5  recon 4.5  kl 0.5  512 img/s  ETA 1s",
        "step 30/30  loss 3.333  recon 3  kl 0.3333  512 img/s",
    ]
    assert not ANSI.search(out.getvalue())


def test_the_eta_comes_from_the_pace_since_the_first_log_point():
    track = Track(None, step=10, total=110, first_seen=(0.0, 10), last_seen=0.0)
    assert track.eta() is None  # one point: no pace yet
    track.step, track.last_seen = 30, 10.0  # 20 steps in 10 s: 80 steps to go take 40 s
    assert track.eta() == pytest.approx(40.0)
    assert "ETA 40s" in track.progress_text()
    assert [format_duration(s) for s in (0, 45, 100, 3600 + 3 * 60 + 5)] == ["0s", "45s", "1m40s", "1h03m"]


def test_verbose_shows_the_log_without_colour_codes_or_protocol_lines():
    display, out = plain_display(verbose=True)
    for line in train_log() + ['AEFORGE_RESULT {"mlflow_run_id": "x"}']:
        display.feed(line)
    text = out.getvalue()
    assert "Requesting resources" in text and "TrainingReport(" in text and "PlacementGroupCleaner" in text
    assert "AEFORGE_" not in text and not ANSI.search(text)
    assert [m.group(1) for m in map(STEP_LINE.match, text.splitlines()) if m] == ["10", "20", "30"]


def test_a_sweep_shows_each_trial_once_with_its_steps_and_metric():
    display, out = plain_display(sweep_trials=2, metric="eval/elbo")
    lines = [
        "(pid=1) aeforge: sweep s-1: 2 trials at once asked, 1 at a time run: each trial needs 1.01 CPU, "
        "the cluster has CPU 2, GPU 0"
    ]
    for name, beta in (("s-t00-beta1", 1.0), ("s-t01-beta4", 4.0)):
        lines += [ray_prefixed(trial_line(name, "running", values={"beta": beta}), "_trial_entry pid=7")] * 2
        for step in (10, 20):
            lines += [ray_prefixed(progress_line(step, 20, metrics={"train/loss": 1.5}, trial=name))] * 2
        lines.append(ray_prefixed(trial_line(name, "finished", metrics={"eval/elbo": -12.25}), "_trial_entry pid=7"))
    lines.append(trial_line("s-t02-beta9", "error", error="DataError: no such file"))
    for line in lines:
        display.feed(line)
    shown = out.getvalue().splitlines()
    assert shown[0] == (
        "note: sweep s-1: 2 trials at once asked, 1 at a time run: each trial needs 1.01 CPU, "
        "the cluster has CPU 2, GPU 0"
    )
    assert shown[1:5] == [
        "trial s-t00-beta1 running (beta 1)",
        "s-t00-beta1  step 10/20  loss 1.5",
        "s-t00-beta1  step 20/20  loss 1.5",
        "trial s-t00-beta1 finished (eval/elbo -12.25)",
    ]
    assert shown.count("s-t01-beta4  step 10/20  loss 1.5") == 1  # the same step of another trial is its own
    assert shown[-1] == "trial s-t02-beta9 failed: DataError: no such file"
    assert [t.state for t in display.tracks()] == ["finished", "finished", "error"]


def test_on_a_terminal_a_live_bar_and_the_loss_parts_replace_the_lines():
    out = io.StringIO()
    display = RunDisplay(Console(file=out, force_terminal=True, width=120, color_system=None))
    display.start()
    for line in train_log():
        display.feed(line)
    display.stop()
    text = out.getvalue()
    assert "30/30" in text and "done" in text and "512 img/s" in text
    assert "loss 3.333  recon 3  kl 0.3333" in text
    assert "note: resuming from /ckpt/step_0 (step 0)" in text
    assert "AEFORGE_" not in text and "TrainingReport" not in text and "step 10/30" not in text


def test_a_live_sweep_table_lists_its_trials():
    out = io.StringIO()
    display = RunDisplay(
        Console(file=out, force_terminal=True, width=160, color_system=None), sweep_trials=3, metric="eval/elbo"
    )
    display.start()
    display.feed(trial_line("s-t00-beta1", "running", values={"beta": 1.0}))
    display.feed(progress_line(10, 20, metrics={"train/loss": 1.5}, images_per_second=300.0, trial="s-t00-beta1"))
    display.feed(trial_line("s-t00-beta1", "finished", metrics={"eval/elbo": -12.25}))
    display.feed(trial_line("s-t01-beta4", "running", values={"beta": 4.0}))
    display.stop()
    last_frame = out.getvalue().rsplit("sweep", 1)[-1]
    assert "2 of 3 trials started, 1 finished, 1 waiting" in last_frame
    assert re.search(r"s-t00-beta1 .*beta 1 .*finished .*10/20 .*1\.5 .*-12\.25 .*300", last_frame)
    assert re.search(r"s-t01-beta4 .*beta 4 .*running", last_frame)


def test_marked_lines_read_back_behind_rays_prefix_and_suffix():
    from workers.protocol import PROGRESS_MARK, TRIAL_MARK, is_protocol_line, parse_progress, read_mark

    line = progress_line(20, 30, metrics={"train/loss": 1.0}, images_per_second=99.94, trial="s-t00")
    assert read_mark(ray_prefixed(line) + " [repeated 2x across cluster]", PROGRESS_MARK) == {
        "step": 20,
        "total": 30,
        "metrics": {"train/loss": 1.0},
        "images_per_second": 99.9,
        "trial": "s-t00",
    }
    assert parse_progress("noise\n" + ray_prefixed(line) + "\nmore noise")["step"] == 20  # the queue's reader
    assert read_mark("AEFORGE_PROGRESS [1, 2]", PROGRESS_MARK) is None
    assert read_mark("AEFORGE_PROGRESS {not json", PROGRESS_MARK) is None
    assert is_protocol_line(ray_prefixed(trial_line("s-t00", "running")))
    assert read_mark(trial_line("s-t00", "error", error="boom"), TRIAL_MARK) == {
        "trial": "s-t00",
        "state": "error",
        "error": "boom",
    }
    with pytest.raises(ValueError, match="one of running, finished, error"):
        trial_line("s-t00", "paused")


def test_notices_are_the_lines_a_job_addresses_to_its_user():
    assert notice_of("\x1b[36m(RayTrainWorker pid=1, ip=10.0.0.2)\x1b[0m aeforge: resuming from x") == "resuming from x"
    assert notice_of("aeforge: sweep j: 4 trials at once asked\n") == "sweep j: 4 trials at once asked"
    assert notice_of("INFO something aeforge: not at the start") is None


# --- the output goes to the log ---------------------------------------------------------------------------------


CAPTURED_SCRIPT = textwrap.dedent("""
    import os, subprocess, sys
    from pathlib import Path
    from services.run_display import showing_progress
    from workers.protocol import emit, progress_line

    with showing_progress(Path(sys.argv[1])):
        print("(TrainController pid=1) Requesting resources: {'CPU': 1.0} * 1")
        os.write(2, b"[C++ core] a line written on file descriptor 2\\n")
        subprocess.run([sys.executable, "-c", "import sys; print('a child process on stderr', file=sys.stderr)"])
        for step in (5, 10):
            line = "(RayTrainWorker pid=2) " + progress_line(step, 10, metrics={"train/loss": 2.0})
            print(line)
            print(line)
    print("after the run")
""")


def test_the_run_output_goes_to_the_log_and_progress_to_the_screen(tmp_path):
    log = tmp_path / "runs" / "job-1" / "run.log"
    done = subprocess.run(
        [sys.executable, "-c", CAPTURED_SCRIPT, str(log)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["step 5/10  loss 2", "step 10/10  loss 2", "after the run"]
    assert done.stderr == ""
    logged = log.read_text()
    assert "Requesting resources" in logged and "[C++ core]" in logged and "a child process on stderr" in logged
    assert logged.count("AEFORGE_PROGRESS") == 4  # the log keeps everything, as written


def test_a_bug_points_at_the_log_and_a_user_error_stays_one_line(tmp_path, monkeypatch):
    import jobs.run
    from services.cli import app
    from workers.data import DataError

    monkeypatch.setenv("AEFORGE_HOME", str(tmp_path / "home"))
    spec = write_spec(tmp_path / "s.yaml")

    def broken(*args, **kwargs):
        print("some Ray output before the failure")
        raise RuntimeError("something aeforge did not expect")

    monkeypatch.setattr(jobs.run, "run_in_process", broken)
    bug = runner.invoke(app, ["run", "--local", "--job-id", "bug-1", str(spec)])
    log = tmp_path / "home" / "runs" / "bug-1" / "run.log"
    assert bug.exit_code == 1
    assert f"the run's log (Ray's and MLflow's output): {log}" in bug.output
    assert "some Ray output before the failure" in log.read_text()

    def user_error(*args, **kwargs):
        raise DataError("data.source: no such file")

    monkeypatch.setattr(jobs.run, "run_in_process", user_error)
    wrong = runner.invoke(app, ["run", "--local", "--job-id", "user-1", str(spec)])
    assert wrong.exit_code == 2
    assert "error: data.source: no such file" in wrong.output
    assert "Traceback" not in wrong.output and "run's log (Ray" not in wrong.output


# --- `--set` ------------------------------------------------------------------------------------------------------


def write_spec(path: Path, **train) -> Path:
    spec = {
        "name": "display-test",
        "model": {"variant": "vae", "architecture": "mlp", "latent_dim": 2, "hidden_dims": [32]},
        "data": {"source": "builtin:dsprites", "limit": 256, "val_fraction": 0.25},
        "train": {"steps": 30, "batch_size": 16, "checkpoint_every": 30, "log_every": 10, **train},
        "eval": {"iwae_samples": 2, "max_examples": 32, "disentanglement": False, "pictures": False, "probe": False},
        "resources": {"workers": 1, "cpus_per_worker": 1},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def test_set_changes_the_spec_before_it_is_validated(tmp_path):
    from jobs.spec import load_spec
    from services.cli import app

    path = write_spec(tmp_path / "s.yaml")
    spec = load_spec(
        path,
        [
            "train.steps=100",
            "model.latent_dim=8",
            "train.optimizer.lr=1e-3",
            "model.hidden_dims=[64, 64]",
            "register.model_name=made-by-set",
            "description=words, and 42",
        ],
    )
    assert spec.train.steps == 100 and spec.model.latent_dim == 8 and spec.train.optimizer.lr == 1e-3
    assert spec.model.hidden_dims == [64, 64] and spec.registration.model_name == "made-by-set"
    assert spec.description == "words, and 42"
    assert load_spec(path, ["train.steps=5", "train.steps=7"]).train.steps == 7  # the last one wins

    ok = runner.invoke(app, ["validate", "--no-data", str(path), "--set", "model.latent_dim=8"])
    assert ok.exit_code == 0, ok.output
    assert "OK  display-test" in ok.output


@pytest.mark.parametrize(
    "setting, loc, words",
    [
        ("train.steps=abc", "train.steps", ["valid integer", "(from --set train.steps=abc)"]),
        ("model.latent_dim=0", "model.latent_dim", ["greater than or equal to 1", "(from --set model.latent_dim=0)"]),
        ("train.stepz=5", "train.stepz", ["unknown key", "(from --set train.stepz=5)"]),
        ("modle.latent_dim=8", "modle", ["unknown key", "(from --set modle.latent_dim=8)"]),
        ("train.steps.x=1", "train.steps", ["is a value (30), not a section", "--set train.steps.x=1"]),
        ("train.steps", "--set", ["'train.steps' is not PATH=VALUE"]),
        ("train..steps=1", "--set", ["is not PATH=VALUE"]),
        ("train.steps=[1, 2", "train.steps", ["not a valid YAML value in --set train.steps=[1, 2"]),
    ],
)
def test_a_bad_setting_is_named_like_a_bad_field_in_the_file(tmp_path, setting, loc, words):
    from services.cli import app

    path = write_spec(tmp_path / "s.yaml")
    for command in (["validate", "--no-data"], ["run", "--local"]):
        result = runner.invoke(app, [*command, str(path), "--set", setting], env={"COLUMNS": "300"})
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        assert f"{path}: 1 error" in text and f"{loc}: " in text, text
        assert all(w in text for w in words), text
        assert "Traceback" not in result.output


# --- end to end ---------------------------------------------------------------------------------------------------


def run_cli(args: list[str], home: Path, timeout: int, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("AEFORGE_", "MLFLOW_"))}
    environ |= {"AEFORGE_HOME": str(home), "PYTHONPATH": str(REPO), "COLUMNS": "200", **env}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_screen(done: subprocess.CompletedProcess, home: Path, total: int, every: int) -> str:
    """The screen of a finished `aeforge run` (piped): the log's path, one line per log point, the final table."""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "AEFORGE_" not in out and "AEFORGE_" not in done.stderr and not ANSI.search(out)
    log = Path(re.search(r"^log: (\S+)", out, re.M).group(1))
    assert log.parent.parent == home / "runs" and log.is_file()
    steps = [int(m.group(1)) for m in map(STEP_LINE.match, out.splitlines()) if m]
    assert steps == list(range(every, total + 1, every)), out
    assert re.search(r"^step 10/\d+  loss \S+  recon \S+  kl \S+  [\d,]+ img/s", out, re.M), out
    assert "final metrics" in out and "eval/elbo" in out
    return log.read_text()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_aeforge_run_local_shows_progress_lines_and_the_table(tmp_path):
    home = tmp_path / "home"
    done = run_cli(["run", "--local", str(write_spec(tmp_path / "s.yaml")), "--set", "train.steps=40"], home, 200)
    logged = check_screen(done, home, total=40, every=10)
    assert logged.count("AEFORGE_PROGRESS") == 4
    assert "run folder:" in done.stdout


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_aeforge_run_on_ray_keeps_rays_output_in_the_log(tmp_path, ray_cluster):
    """`aeforge run` as a user runs it (its own process, piped), joined to the tests' Ray cluster."""
    home = tmp_path / "home"
    done = run_cli(
        ["run", str(write_spec(tmp_path / "s.yaml"))],
        home,
        280,
        RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address,
        RAY_AUTH_MODE="disabled",
    )
    logged = check_screen(done, home, total=30, every=10)
    assert "(RayTrainWorker pid=" in logged and "TrainingReport(" in logged  # Ray's own lines
    assert "(TrainController pid=" in logged
    assert "RayTrainWorker" not in done.stdout and "TrainingReport" not in done.stdout
    assert "MLflow run:" in done.stdout
    # The worker wrote each log point once (not print()'s double under Ray Train), with its loss parts and speed.
    points = [
        json.loads(line.split("AEFORGE_PROGRESS ", 1)[1]) for line in logged.splitlines() if "AEFORGE_PROGRESS" in line
    ]
    assert [p["step"] for p in points] == [10, 20, 30]
    assert all(
        set(p["metrics"]) == {"train/loss", "train/recon", "train/kl"} and p["images_per_second"] > 0 for p in points
    )


def test_phases_are_named_with_their_parts_and_eta_once_each():
    from workers.protocol import phase_line

    display, out = plain_display()
    for line in [
        phase_line("starting Ray"),
        ray_prefixed(phase_line("loading data")),
        *train_log(total=20, every=10)[3:],
        ray_prefixed(phase_line("evaluating", detail="eval/elbo", done=0, total=3)),
        ray_prefixed(phase_line("evaluating", detail="eval/mig", done=1, total=3, eta_s=12)),
        ray_prefixed(phase_line("evaluating", detail="eval/mig", done=1, total=3, eta_s=12)),  # Ray's duplicate
        ray_prefixed(phase_line("pictures")),
        phase_line("registering", detail="quickstart-btcvae"),
    ]:
        display.feed(line)
    lines = out.getvalue().splitlines()
    phases = [line for line in lines if line.startswith("phase: ")]
    assert phases == [
        "phase: starting Ray",
        "phase: loading data",
        "phase: evaluating eval/elbo (0 of 3)",
        "phase: evaluating eval/mig (1 of 3)  ETA 12s",
        "phase: pictures",
        "phase: registering quickstart-btcvae",
    ]
    assert lines.index("phase: loading data") < lines.index(next(x for x in lines if x.startswith("step 20/20")))
