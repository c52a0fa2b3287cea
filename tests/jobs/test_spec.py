"""The job spec: field-level errors, cross-section rules, sweep spaces, examples, and `aeforge validate`."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobs.spec import JobSpec, SpecError, load_spec, parse_spec
from services.cli import app

EXAMPLES = Path(__file__).resolve().parents[2] / "jobs" / "examples"
runner = CliRunner()


def errors_of(text: str) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_spec(text, "test.yaml")
    return {e["loc"]: e["msg"] for e in info.value.errors}


def test_minimal_spec_gets_the_disentanglement_lib_defaults():
    spec = parse_spec("name: m\n")
    assert spec.kind == "train"
    assert (spec.model.latent_dim, spec.train.batch_size, spec.train.steps) == (10, 64, 300_000)
    assert spec.train.optimizer.lr == 1e-4 and spec.model.likelihood == "bernoulli"
    assert spec.model.architecture == "conv64" and spec.data.source == "builtin:dsprites"


def test_json_is_accepted_too():
    spec = parse_spec('{"name": "j", "model": {"variant": "beta_vae", "beta": 4}}')
    assert spec.model.effective_beta == 4.0


def test_every_field_error_is_named_by_its_path():
    errs = errors_of(
        "name: x\n"
        "model: {variant: dae, latent_dim: 0, corruption: {kind: mask, level: 1.5}, bogus: 1}\n"
        "train: {batch_size: 0, optimizer: {lr: -1}}\n"
        "surprise: true\n"
    )
    assert "greater than or equal to 1" in errs["model.latent_dim"]
    assert "less than or equal to 1" in errs["model.corruption.level"]
    assert "unknown key" in errs["model.bogus"]
    assert "unknown key" in errs["surprise"]
    assert "train.batch_size" in errs and "train.optimizer.lr" in errs


@pytest.mark.parametrize(
    "model, loc, words",
    [
        ("{variant: vae, corruption: {kind: mask, level: 0.5}}", "model.corruption", "only for variant 'dae'"),
        ("{variant: beta_vae, tc_estimator: mss}", "model.tc_estimator", "only for variant 'beta_tcvae'"),
        ("{variant: ae, beta: 4}", "model.beta", "only for variants 'beta_vae' and 'beta_tcvae'"),
        ("{variant: beta_vae, beta: -1}", "model.beta", "greater than or equal to 0"),
    ],
)
def test_variant_rules(model, loc, words):
    assert words in errors_of(f"name: x\nmodel: {model}\n")[loc]


def test_minibatch_tc_estimators_need_a_batch_of_two():
    errs = errors_of("name: x\nmodel: {variant: beta_tcvae}\ntrain: {batch_size: 1}\n")
    assert "at least 2" in errs["train.batch_size"]


def test_steps_and_epochs_are_exclusive_and_bf16_needs_gpus():
    assert "either 'steps' or 'epochs'" in errors_of("name: x\ntrain: {steps: 5, epochs: 2}\n")["train.epochs"]
    assert "needs GPUs" in errors_of("name: x\ntrain: {precision: bf16}\n")["train.precision"]


def test_yaml_syntax_errors_and_non_mappings_are_clear():
    assert "line" in errors_of("name: [unclosed\n")["<file>"]
    assert "mapping" in errors_of("- a\n- b\n")["<file>"]
    assert "empty" in errors_of("")["<file>"]


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nope.yaml")


def test_sweep_space_grid_and_log_range():
    spec = parse_spec(
        "name: s\nkind: sweep\nmodel: {variant: beta_tcvae}\n"
        "sweep: {beta: {start: 1, stop: 16, num: 5, spacing: log}, latent_dim: [5, 10], seed: [0, 1]}\n"
    )
    assert spec.sweep.space()["beta"] == [1.0, 2.0, 4.0, 8.0, 16.0]
    trials = spec.trial_configs()
    assert len(trials) == 5 * 2 * 2
    one = spec.with_trial(trials[3])
    assert one.kind == "train" and one.sweep is None
    assert (one.model.beta, one.model.latent_dim, one.train.seed) == (
        trials[3]["beta"],
        trials[3]["latent_dim"],
        trials[3]["seed"],
    )


def test_sweep_validation_errors():
    errs = errors_of("name: s\nkind: sweep\nmodel: {variant: beta_vae}\nsweep: {latent_dim: []}\n")
    assert "empty list" in errs["sweep.latent_dim"]
    errs = errors_of("name: s\nkind: sweep\nmodel: {variant: beta_vae}\nsweep: {search: grid}\n")
    assert "search space is empty" in errs["sweep"]
    errs = errors_of("name: s\nkind: sweep\nmodel: {variant: vae}\nsweep: {beta: [1, 2]}\n")
    assert "beta_vae or beta_tcvae" in errs["sweep.beta"]
    errs = errors_of(
        "name: s\nkind: sweep\nmodel: {variant: beta_vae}\nsweep: {beta: [1], metric: {name: eval/nothing}}\n"
    )
    assert "no trial reports 'eval/nothing'" in errs["sweep.metric.name"]
    assert "needs a 'sweep' section" in errors_of("name: s\nkind: sweep\n")["sweep"]


def test_sweep_over_variants_compares_beta_vae_and_beta_tcvae():
    spec = parse_spec(
        "name: s\nkind: sweep\nmodel: {variant: beta_vae}\nsweep: {variant: [beta_vae, beta_tcvae], beta: [2, 4]}\n"
    )
    variants = {spec.with_trial(t).model.variant for t in spec.trial_configs()}
    assert variants == {"beta_vae", "beta_tcvae"}


def test_a_variants_own_settings_apply_to_that_variants_trials_of_a_variant_sweep():
    spec = parse_spec(
        "name: s\nkind: sweep\nmodel: {variant: beta_tcvae, tc_estimator: mws}\n"
        "sweep: {variant: [beta_vae, beta_tcvae], beta: [2]}\n"
    )
    models = {m.variant: m for m in (spec.with_trial(t).model for t in spec.trial_configs())}
    assert (models["beta_tcvae"].tc_estimator, models["beta_vae"].tc_estimator) == ("mws", None)
    errs = errors_of(
        "name: s\nkind: sweep\nmodel: {variant: beta_tcvae, tc_estimator: mws}\nsweep: {variant: [beta_vae, vae]}\n"
    )
    assert "no beta_tcvae trial" in errs["model.tc_estimator"]


def test_eval_factors_are_checked_against_the_data_before_anything_runs(tmp_path):
    import numpy as np

    from jobs.spec import check_data

    check_data(parse_spec("name: f\neval: {factors: [scale, pos_x]}\n"))
    with pytest.raises(SpecError) as info:
        check_data(parse_spec("name: f\neval: {factors: [scale, colour]}\n"))
    assert {e["loc"]: e["msg"] for e in info.value.errors} == {
        "eval.factors": "'colour': not a factor of builtin:dsprites (factors: shape, scale, orientation, pos_x, pos_y)"
    }
    plain = tmp_path / "plain.npz"
    np.savez(plain, images=np.zeros((8, 8, 8), dtype=np.uint8))
    with pytest.raises(SpecError) as info:
        check_data(
            parse_spec(
                f"name: f\nmodel: {{architecture: mlp}}\ndata: {{source: {plain}}}\n"
                f"train: {{batch_size: 2}}\neval: {{factors: [x]}}\n"
            )
        )
    assert "no ground-truth factors" in {e["loc"]: e["msg"] for e in info.value.errors}["eval.factors"]
    assert "names one twice" in errors_of("name: f\neval: {factors: [scale, scale]}\n")["eval.factors"]
    assert "greater than or equal to 2" in errors_of("name: f\neval: {mig_chen_rows: 1}\n")["eval.mig_chen_rows"]


def test_register_section_uses_the_register_key():
    spec = parse_spec("name: r\nregister: {model_name: my-model, alias: best}\n")
    assert spec.registration.model_name == "my-model"
    assert spec.model_dump(mode="json")["register"]["alias"] == "best"
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_parses(path):
    load_spec(path)


def test_validate_cli_reports_field_errors_with_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {variant: vae, latent_dim: 0, tc_estimator: mws}\n")
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "model.latent_dim" in result.output
    assert "Traceback" not in result.output


def test_schema_cli_prints_json_schema():
    import json

    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert "model" in schema["properties"] and "register" in schema["properties"]


# --- bad input: finite numbers, bounded runs and sweeps, unreadable text (issue 9) --------------------------------


@pytest.mark.parametrize(
    "text, loc",
    [
        ("model: {variant: beta_vae, beta: .inf}", "model.beta"),
        ("model: {variant: dae, corruption: {level: .nan}}", "model.corruption.level"),
        ("resources: {cpus_per_worker: .inf}", "resources.cpus_per_worker"),
        ("resources: {gpus_per_worker: .inf}", "resources.gpus_per_worker"),
        ("train: {optimizer: {lr: .inf}}", "train.optimizer.lr"),
        ("train: {optimizer: {betas: [.nan, 0.9]}}", "train.optimizer.betas[0]"),
        ("train: {grad_clip: .inf}", "train.grad_clip"),
        ("train: {max_hours: .inf}", "train.max_hours"),
        ("data: {val_fraction: .nan}", "data.val_fraction"),
        ("eval: {probe_finetune_lr: .inf}", "eval.probe_finetune_lr"),
        ("kind: sweep\nmodel: {variant: beta_vae}\nsweep: {beta: [1, .inf]}", "sweep.beta[1]"),
        ("kind: sweep\nmodel: {variant: beta_vae}\nsweep: {beta: {start: 1, stop: .inf, num: 3}}", "sweep.beta.stop"),
    ],
)
def test_every_number_in_a_spec_is_finite(text, loc):
    assert errors_of(f"name: x\n{text}\n")[loc].startswith("Input should be a finite number, got ")


def test_steps_epochs_and_resources_are_bounded():
    assert (
        "less than or equal to 1000000000"
        in errors_of("name: x\ntrain: {steps: 1000000000000000000000000000000}\n")["train.steps"]
    )
    assert "less than or equal to 1000000" in errors_of("name: x\ntrain: {epochs: 1000001}\n")["train.epochs"]
    assert parse_spec("name: x\ntrain: {steps: 1000000000}\n").train.steps == 10**9
    errs = errors_of("name: x\nresources: {workers: 1000000, cpus_per_worker: 1.0e+308}\n")
    assert {"resources.workers", "resources.cpus_per_worker"} <= set(errs)


def test_max_hours_is_an_optional_positive_limit():
    assert parse_spec("name: x\n").train.max_hours is None
    spec = parse_spec("name: x\ntrain: {max_hours: 0.25}\n")
    assert spec.train.max_hours == 0.25 and spec.model_dump(mode="json")["train"]["max_hours"] == 0.25
    assert "greater than 0" in errors_of("name: x\ntrain: {max_hours: 0}\n")["train.max_hours"]
    assert "train.max_hours" in errors_of("name: x\ntrain: {max_hours: -1}\n")


def test_a_sweep_is_counted_without_building_its_grid_and_bounded(monkeypatch):
    import time

    from jobs.spec import MAX_TRIALS

    def no_grid(self):
        raise AssertionError("the grid was built")

    monkeypatch.setattr(JobSpec, "trial_configs", no_grid)
    values = ", ".join(str(i) for i in range(1, 201))
    started = time.perf_counter()
    errs = errors_of(
        f"name: s\nkind: sweep\nmodel: {{variant: beta_vae}}\n"
        f"sweep: {{beta: [{values}], latent_dim: [{values}], seed: [{values}]}}\n"
    )
    assert time.perf_counter() - started < 1.0
    assert "8,000,000 trials" in errs["sweep"] and f"at most {MAX_TRIALS:,}" in errs["sweep"]
    exactly = parse_spec(
        "name: s\nkind: sweep\nmodel: {variant: beta_vae}\n"
        "sweep: {beta: {start: 1, stop: 2, num: 100}, seed: [0, 1, 2, 3, 4], num_samples: 20}\n"
    )
    assert exactly.num_trials() == MAX_TRIALS
    assert exactly.resource_request() == {"CPU": 1.0, "GPU": 0.0}
    one_more = errors_of(
        "name: s\nkind: sweep\nmodel: {variant: beta_vae}\n"
        "sweep: {beta: {start: 1, stop: 2, num: 91}, seed: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], num_samples: 10}\n"
    )
    assert "10,010 trials (91 beta x 11 seed x 10 num_samples)" in one_more["sweep"]
    assert "sweep.beta.num" in errors_of(
        "name: s\nkind: sweep\nmodel: {variant: beta_vae}\nsweep: {beta: {start: 0, stop: 1, num: 100000000}}\n"
    )
    assert "sweep.num_samples" in errors_of(
        "name: s\nkind: sweep\nmodel: {variant: beta_vae}\nsweep: {beta: [1], search: random, num_samples: 10001}\n"
    )


def test_trial_configs_still_builds_the_grid():
    spec = parse_spec("name: s\nkind: sweep\nmodel: {variant: beta_vae}\nsweep: {beta: [1, 2], seed: [0, 1, 2]}\n")
    assert spec.num_trials() == len(spec.trial_configs()) == 6


def test_deep_or_unbuildable_yaml_is_a_spec_error_not_a_crash():
    from jobs.spec import spec_from_data

    assert "nested too deeply" in errors_of("[" * 5000 + "]" * 5000)["<file>"]
    assert "nested too deeply" in errors_of("name: x\ndescription: " + "[" * 5000 + "]" * 5000 + "\n")["<file>"]
    assert "month must be in 1..12" in errors_of("name: 2020-13-45\n")["<file>"]
    assert "4300 digits" in errors_of("name: x\ntrain: {steps: " + "9" * 5000 + "}\n")["<file>"]
    assert "not a valid YAML/JSON value" in errors_of("name: x\nseed: !!int abc\n")["<file>"]
    deep: list = []
    inner = deep
    for _ in range(100_000):  # deeper than any recursion limit: pydantic must not recurse into it
        inner.append([])
        inner = inner[0]
    for data in (
        {"name": "x", "description": deep},
        {"name": "x", "model": {"hidden_dims": deep}},
        {"name": "x", "x": deep},
    ):
        with pytest.raises(SpecError):
            spec_from_data(data)


@pytest.mark.parametrize(
    "text,loc",
    [
        ("model: {latent_dim: 1000000000}", "model.latent_dim"),
        ("model: {architecture: mlp, hidden_dims: [1000000000]}", "model.hidden_dims"),
        ("model: {architecture: mlp, hidden_dims: [" + ", ".join(["8"] * 10_000) + "]}", "model.hidden_dims"),
        ("train: {batch_size: 1000000000}", "train.batch_size"),
        ("train: {max_failures: 1000000000}", "train.max_failures"),
        ("eval: {iwae_samples: 1000000000}", "eval.iwae_samples"),
        ("eval: {mig_chen_rows: 1000000000000000000000000000000}", "eval.mig_chen_rows"),
        ("data: {source: /d/x, image_size: 1000000}", "data.image_size"),
        ("kind: sweep\nsweep: {beta: [1, 2], pack: 1180591620717411303424}", "sweep.pack"),
        ("kind: sweep\nsweep: {beta: [1, 2], max_concurrent_trials: 1000000000000}", "sweep.max_concurrent_trials"),
        ("kind: sweep\nsweep: {latent_dim: [2, 1000000000]}", "sweep.latent_dim"),
        ("resources: {cpus_per_worker: 10000}", "resources.cpus_per_worker"),
        ("resources: {gpus_per_worker: 1000}", "resources.gpus_per_worker"),
    ],
)
def test_every_size_knob_is_bounded(text, loc):
    """The values a probe submitted and the queue accepted (issue 19): each refused, naming its field."""
    model = "" if text.startswith("model:") else "model: {variant: beta_vae}\n"
    assert loc in errors_of(f"name: x\n{model}{text}\n")


def test_a_spec_with_three_errors_lists_all_three_at_their_fields():
    errs = errors_of(
        "name: x\nmodel: {variant: ae, beta: 4, tc_estimator: mss, corruption: {kind: mask}}\n"
        "train: {steps: 5, epochs: 2, compile: false, compile_mode: default}\n"
    )
    assert set(errs) == {"model.beta", "model.tc_estimator", "model.corruption", "train.epochs", "train.compile_mode"}
    # An unknown key beside them does not hold the others back for another round.
    errs = errors_of("name: x\nmodel: {variant: ae, beta: 4, latent_dims: 3}\ntrain: {steps: 5, epochs: 2, stepz: 3}\n")
    assert set(errs) == {"model.latent_dims", "model.beta", "train.stepz", "train.epochs"}


def test_an_unknown_key_or_value_gets_the_nearest_valid_one_and_the_bad_value_is_echoed():
    errs = errors_of("name: x\nmodel: {variant: vea, latent_dims: 4}\ntrain: {batch_size: -3}\n")
    assert errs["model.latent_dims"] == "unknown key 'latent_dims'; did you mean 'latent_dim'?"
    assert "'vea' is not one of" in errs["model.variant"] and "did you mean 'vae'?" in errs["model.variant"]
    assert errs["train.batch_size"].endswith("got -3")
    assert "did you mean 'model'?" in errors_of("name: x\nmodle: {}\n")["modle"]


def test_a_message_never_repeats_its_field_path():
    error = SpecError([{"loc": "data.source", "msg": "data.source: no such file or folder: /x"}], "spec.yaml")
    assert error.errors == [{"loc": "data.source", "msg": "no such file or folder: /x"}]
    assert "data.source: data.source" not in str(error)
