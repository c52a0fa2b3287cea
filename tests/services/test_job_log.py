"""A job's log as a person reads it (services/job_log.py): what `aeforge logs` and AeforgeClient.logs() show."""

from __future__ import annotations

from services.job_log import ReadableLog, is_ray_noise, phase_text, readable_lines, readable_text
from workers.protocol import parse_phase, phase_line, progress_line, result_line, trial_line


def ray(line: str, who: str = "RayTrainWorker pid=4242, ip=10.0.0.2") -> str:
    return f"\x1b[36m({who})\x1b[0m {line}"


STEP = progress_line(
    50, 1200, metrics={"train/loss": 123.4, "train/recon": 110.2, "train/kl": 13.2}, images_per_second=512, eta_s=100
)

RAY_LOG = [
    "2026-12-07 13:00:00,000\tINFO worker.py:2029 -- Started a local Ray instance.",
    ray("Requesting resources: {'CPU': 1.0} * 1", "TrainController pid=12540"),
    ray(STEP),
    ray(STEP),  # Ray forwards a worker's line twice when its stdout is wrapped
    ray("Traceback (most recent call last):", "PlacementGroupCleaner pid=99"),
    ray(
        "ValueError: Found multiple active Ray instances: {'10.0.0.2:6379', '10.0.0.2:6380'}.",
        "PlacementGroupCleaner pid=99",
    ),
    ray("PreemptionWatcher poll failed", "TrainController pid=12540"),
    ray(phase_line("evaluating", detail="eval/mig", done=4, total=11, eta_s=40)),
    "aeforge: fit 612 s: start 20 s, steps 450 s, evaluation 135 s",
    result_line({"mlflow_run_id": "abc", "metrics": {"eval/elbo": -88.2}}),
]


def test_the_readable_log_has_step_lines_and_rays_lines_without_codes_protocol_or_noise():
    lines = readable_lines("\n".join(RAY_LOG) + "\n")
    assert lines == [
        "2026-12-07 13:00:00,000\tINFO worker.py:2029 -- Started a local Ray instance.",
        "(TrainController pid=12540) Requesting resources: {'CPU': 1.0} * 1",
        "step 50/1200  loss 123.4  recon 110.2  kl 13.2  512 img/s  ETA 1m40s",
        "phase: evaluating eval/mig (4 of 11)  ETA 40s",
        "aeforge: fit 612 s: start 20 s, steps 450 s, evaluation 135 s",
    ]
    text = readable_text("\n".join(RAY_LOG))
    assert "\x1b" not in text and "AEFORGE_" not in text and "PlacementGroupCleaner" not in text


def test_lines_cut_between_chunks_come_out_whole_and_a_new_attempt_shows_its_steps_again():
    reader = ReadableLog()
    whole = ray(STEP) + "\n"
    assert reader.feed(whole[:30]) == []
    assert reader.feed(whole[30:]) == ["step 50/1200  loss 123.4  recon 110.2  kl 13.2  512 img/s  ETA 1m40s"]
    assert reader.feed(whole) == []  # the same step again (Ray's duplicate)
    assert reader.feed("\n[aeforge] job j1: attempt 2\n" + whole) == [
        "",
        "[aeforge] job j1: attempt 2",
        "step 50/1200  loss 123.4  recon 110.2  kl 13.2  512 img/s  ETA 1m40s",
    ]


def test_a_sweeps_lines_name_their_trial():
    log = "\n".join(
        [
            trial_line("t01", "running", values={"beta": 4.0}),
            progress_line(10, 100, metrics={"train/loss": 2.0}, trial="t01"),
            phase_line("pictures", trial="t01"),
            trial_line("t01", "finished", metrics={"eval/mig": 0.41}),
        ]
    )
    assert readable_lines(log) == [
        "trial t01 running (beta 4)",
        "t01  step 10/100  loss 2",
        "t01  phase: pictures",
        "trial t01 finished: eval/mig 0.41",
    ]


def test_the_phase_of_a_log_is_its_last_phase_or_the_training_step_after_it():
    assert parse_phase("") is None
    log = phase_line("starting Ray") + "\n" + ray(STEP)
    assert parse_phase(log)["phase"] == "training" and parse_phase(log)["step"] == 50
    log += "\n" + ray(phase_line("evaluating", detail="eval/dci", done=6, total=11, eta_s=75))
    assert phase_text(parse_phase(log)) == "evaluating eval/dci (6 of 11)  ETA 1m15s"
    assert phase_text({"phase": "training", **parse_phase(ray(STEP))}).startswith("training  step 50/1200")


def test_noise_is_told_by_the_process_that_printed_it():
    assert is_ray_noise("(PlacementGroupCleaner pid=1) Traceback (most recent call last):")
    assert is_ray_noise("(PreemptionWatcher pid=1, ip=10.0.0.3) polling")
    assert not is_ray_noise("(RayTrainWorker pid=1) Traceback (most recent call last):")


def test_a_phase_is_one_of_the_known_ones_and_a_column_value_is_never_minus_zero():
    import pytest

    from services.cli_output import metric_text
    from workers.plots import signed

    with pytest.raises(ValueError, match="a phase is one of"):
        phase_line("thinking")
    assert [signed(v) for v in (-2.0, -0.0, 0.0, 1.5)] == ["-2", "0", "0", "+1.5"]
    assert [metric_text(v) for v in (-0.0, -0.00004, -1e-9 * 0, 12.5)] == ["0.0000", "-4.000e-05", "0.0000", "12.5000"]
    assert metric_text(-0.00000001 * 0 - 0.0) == "0.0000"
