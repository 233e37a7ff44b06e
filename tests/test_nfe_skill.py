"""benchmarks/nfe_skill.py: the sampler grid it runs and the rule it reports."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import nfe_skill  # noqa: E402

from jax_corrdiff.inference.generate import SAMPLER_PRESETS  # noqa: E402


def test_each_sampler_uses_at_most_its_evaluation_budget_and_the_reference_is_heun_18():
    for solver in nfe_skill.SOLVERS:
        for budget in nfe_skill.EVALUATIONS:
            sampler = nfe_skill.sampler_for(solver, nfe_skill.steps_for(solver, budget))
            assert budget - 1 <= sampler.network_evaluations <= budget, (solver, budget)
            assert (sampler.sigma_min, sampler.sigma_max, sampler.s_churn) == (0.002, 800.0, 0.0)
    reference = nfe_skill.sampler_for(*nfe_skill.REFERENCE)
    assert reference.network_evaluations == 35
    assert (reference.solver, reference.num_steps) == (SAMPLER_PRESETS["stochastic"]["solver"], 18)


def _row(solver, evaluations, crps):
    return {"solver": solver, "evaluations": evaluations, "scores": {"t2m": {"crps": crps}}}


def test_fewest_evaluations_within_two_percent_of_the_reference():
    rows = [
        _row("heun", 35, 1.00),
        _row("heun", 17, 1.019),  # within 2%
        _row("heun", 11, 1.021),  # just outside
        _row("euler", 35, 1.03),
        _row("dpmpp_2m", 4, 1.5),
        _row("dpmpp_2m", 8, 0.99),
        _row("dpmpp_2m", 12, 1.01),
    ]
    assert nfe_skill.fewest_within(rows, "t2m", 1.0) == {"heun": 17, "euler": None, "dpmpp_2m": 8}
