"""What a spec must fit besides its schema (jobs.limits): MLflow's lengths, named by field at submit, and the
memory of the largest node against a job's estimated need."""

from __future__ import annotations

import pytest

from jobs.limits import (
    MAX_EXPERIMENT_TAG_VAL_LENGTH,
    check_submission_limits,
    memory_errors,
    mlflow_limit_errors,
    training_memory,
)
from jobs.spec import SpecError, parse_spec

BASE = "name: limits\nmodel: {variant: beta_vae, architecture: conv64, latent_dim: 10}\ntrain: {steps: 10}\n"
GIB = 1024**3


def fields(spec_text: str) -> dict[str, str]:
    return {e["loc"]: e["msg"] for e in mlflow_limit_errors(parse_spec(spec_text))}


def test_a_description_past_mlflows_limit_is_refused_with_the_room_left():
    assert fields(BASE + f"description: {'x' * 18_000}\n") == {}
    msg = fields(BASE + f"description: {'x' * 20_001}\n")["description"]
    assert "20,001 characters" in msg and f"{MAX_EXPERIMENT_TAG_VAL_LENGTH:,}" in msg and "at most" in msg


def test_a_registered_models_description_and_a_long_source_are_refused_by_field():
    spec = BASE + "register: {model_name: m, description: " + "y" * 4_000 + "}\n"
    assert "5,000" in fields(spec)["register.description"]
    assert fields(BASE + "register: {model_name: m, description: short}\n") == {}
    with pytest.raises(SpecError, match="data.source"):  # longer than any path: the schema refuses it first
        parse_spec(BASE + "data: {source: /data/" + "d" * 9_000 + ".npz}\n")


def test_a_sweep_over_thousands_of_values_is_summarised_to_fit_mlflow():
    betas = ", ".join(repr(1 / (i + 3)) for i in range(10_000))
    spec = parse_spec(f"name: s\nkind: sweep\nmodel: {{variant: beta_vae}}\nsweep: {{beta: [{betas}]}}\n")
    assert mlflow_limit_errors(spec) == []
    from jobs.lineage import experiment_description

    assert "beta 10,000 values: 0.333333, 0.25, … " in experiment_description(spec, "best")


def test_a_200_kb_spec_is_refused_at_submit_with_a_clear_message():
    with pytest.raises(SpecError) as refused:
        check_submission_limits(parse_spec(BASE + f"description: {'z' * 200_000}\n"))
    assert [e["loc"] for e in refused.value.errors] == ["description"]


def test_a_job_that_cannot_fit_the_largest_node_is_refused_with_the_numbers():
    small = parse_spec(BASE + "train: {steps: 10, batch_size: 64}\n")
    need, _ = training_memory(small)
    assert 1e6 < need < 2 * GIB  # a disentanglement_lib model at batch 64: tens of MB
    assert memory_errors(small, 8 * GIB) == [] and memory_errors(small, None) == []
    huge = parse_spec(
        "name: huge\nmodel: {variant: ae, architecture: mlp, hidden_dims: [65536, 65536, 65536]}\n"
        "data: {source: 'builtin:dsprites'}\ntrain: {steps: 10, batch_size: 4096}\n"
    )
    [error] = memory_errors(huge, 64 * GIB)
    assert error["loc"] == "train.batch_size" and "GiB to train" in error["msg"] and "64.0 GiB" in error["msg"]
    sweep = parse_spec(
        "name: s\nkind: sweep\nmodel: {variant: beta_vae, architecture: conv64}\ntrain: {steps: 10, batch_size: 64}\n"
        "sweep: {latent_dim: [2, 10], beta: [1, 2], pack: 4}\n"
    )
    need_pack, what = training_memory(sweep)
    assert "4 x beta_vae" in what and need_pack > 3 * training_memory(small)[0]


def test_the_services_warm_up_estimate_is_a_valid_spec_and_runs():
    """The service runs one memory estimate at start (so its first submission does not pay torch's first-call
    cost); the spec it uses must stay valid as the schema changes, or the warm-up would only log a failure."""
    from jobs.limits import _WARM_UP_SPEC, training_memory, warm_up
    from jobs.spec import parse_spec

    warm_up()
    need, what = training_memory(parse_spec(_WARM_UP_SPEC, "<warm-up>"))
    assert need > 0 and "beta_vae" in what
