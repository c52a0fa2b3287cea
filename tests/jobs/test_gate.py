"""The registry's gate (jobs/gate.py): health from the final metrics, and whether an alias may move."""

import pytest

from jobs.gate import Incumbent, decide, health, number, row_health

GOOD = {"eval/elbo": -88.2, "eval/active_units": 5.0, "eval/kl": 20.0, "eval/kl_per_latent": 3.3, "eval/collapsed": 0.0}
WEAK = {"eval/elbo": -473.1, "eval/active_units": 2.0, "eval/kl": 4.0, "eval/kl_per_latent": 0.7, "eval/collapsed": 0.0}
COLLAPSED = {
    "eval/elbo": -300.0,
    "eval/active_units": 0.0,
    "eval/kl": 0.37,
    "eval/kl_per_latent": 0.06,
    "eval/collapsed": 1.0,
}


def test_health_names_what_is_wrong_with_the_numbers():
    assert health(GOOD, "eval/elbo").healthy
    verdict = health(COLLAPSED, "eval/elbo")
    assert not verdict.healthy and verdict.label == "collapsed"
    assert verdict.reason == "collapsed: 0 active units, eval/kl 0.37 nats (0.06 per latent)"
    assert (
        health({"eval/elbo": float("nan")}, "eval/elbo").reason == "no-metric: eval/elbo is nan (not a finite number)"
    )
    assert health({}, "eval/mig").reason == "no-metric: eval/mig is not reported"
    assert health(GOOD, "eval/elbo", status="FAILED").label == "failed"
    # An autoencoder reports no collapse flag: finished with a finite metric is healthy.
    assert health({"eval/recon": 12.0}, "eval/recon").healthy
    assert row_health({**GOOD, "status": "running"}, "eval/elbo").label == "running"


def test_the_alias_stays_on_a_better_version_and_says_why():
    kept = decide("candidate", "3", WEAK, "eval/elbo", "max", Incumbent("1", GOOD))
    assert not kept.moved and kept.compared_with == "1"
    assert kept.message.startswith("@candidate stays on v1: v3's eval/elbo -473.1 is worse than v1's -88.2")
    forced = decide("candidate", "3", WEAK, "eval/elbo", "max", Incumbent("1", GOOD), force=True)
    assert forced.moved and "by --force" in forced.message


def test_the_alias_moves_to_a_version_that_is_not_worse_and_a_first_version_takes_it():
    better = decide("candidate", "2", GOOD, "eval/elbo", "max", Incumbent("1", WEAK))
    assert better.moved and better.message.startswith("@candidate moved from v1 to v2")
    tie = decide("candidate", "2", GOOD, "eval/elbo", "max", Incumbent("1", GOOD))
    assert tie.moved
    first = decide("candidate", "1", GOOD, "eval/elbo", "max", None)
    assert first.moved and first.message == "@candidate moved to v1 (eval/elbo -88.2)"
    # min mode: a lower reconstruction error is better.
    assert decide("best", "2", {"eval/recon": 5.0}, "eval/recon", "min", Incumbent("1", {"eval/recon": 6.0})).moved
    assert not decide("best", "2", {"eval/recon": 7.0}, "eval/recon", "min", Incumbent("1", {"eval/recon": 6.0})).moved
    # An incumbent without the metric cannot be better.
    assert decide("candidate", "2", GOOD, "eval/elbo", "max", Incumbent("1", {})).moved


@pytest.mark.parametrize("force", [False, True])
def test_a_collapsed_or_unfinished_version_never_takes_the_alias(force):
    collapsed = decide("candidate", "4", COLLAPSED, "eval/elbo", "max", Incumbent("1", GOOD), force=force)
    assert not collapsed.moved
    assert (
        collapsed.message
        == "@candidate stays on v1: v4 is collapsed: 0 active units, eval/kl 0.37 nats (0.06 per latent)"
    )
    alone = decide("candidate", "1", COLLAPSED, "eval/elbo", "max", None, force=force)
    assert not alone.moved and alone.message.startswith("@candidate is not set: v1 is collapsed")
    failed = decide("candidate", "2", GOOD, "eval/elbo", "max", None, force=force, status="failed")
    assert not failed.moved and "did not finish" in failed.message


def test_numbers_read_as_people_write_them():
    assert number(-473.14159) == "-473.1" and number(-0.00001, 2) == "-1e-05" and number(-0.0) == "0"


def test_the_gate_metric_is_the_specs_the_sweeps_or_the_variants():
    from jobs.spec import JobSpec

    def spec(**extra):
        base = {"name": "g", "model": {"variant": "vae", "architecture": "mlp", "latent_dim": 2}}
        base.update(extra)
        return JobSpec.model_validate(base)

    assert spec().gate_metric().model_dump() == {"name": "eval/elbo", "mode": "max"}
    ae = spec(model={"variant": "ae", "architecture": "mlp", "latent_dim": 2})
    assert ae.gate_metric().model_dump() == {"name": "eval/recon", "mode": "min"}
    chosen = spec(register={"model_name": "g", "metric": {"name": "eval/iwae_ll", "mode": "max"}})
    assert chosen.gate_metric().name == "eval/iwae_ll"
    swept = spec(
        kind="sweep",
        model={"variant": "beta_vae", "architecture": "mlp", "latent_dim": 2},
        sweep={"beta": [1.0], "metric": {"name": "eval/kl", "mode": "min"}},
    )
    assert swept.gate_metric().model_dump() == {"name": "eval/kl", "mode": "min"}
    assert spec(register={"model_name": "g", "alias": None}).registration.alias is None


def test_a_register_metric_no_run_reports_is_a_spec_error():
    from jobs.spec import SpecError, parse_spec

    with pytest.raises(SpecError) as info:
        parse_spec(
            "name: g\nmodel: {variant: ae, architecture: mlp, latent_dim: 2}\n"
            "register: {model_name: g, metric: {name: eval/kl}}\n",
            "g.yaml",
        )
    assert [e["loc"] for e in info.value.errors] == ["register.metric.name"]
    assert "no run reports 'eval/kl'" in info.value.errors[0]["msg"]
