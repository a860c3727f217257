"""schedule.name=wsd: warmup, stable, decay of a chosen length and shape to a floor, checked against
values computed by hand; a pure function of the step (what resume and branching rely on)."""

import pytest

from ct_stages.optim import ScheduleConfig, lr_factor

# max_steps 20, warmup 4, decay over the last 8 steps (from step 12), floor 0.1. The decay's
# progress at step s is t = (s - 12) / 8; the factor is 1 - 0.9 * shape(t).
STEPS = [0, 3, 4, 11, 12, 14, 16, 18, 19, 20]
HAND = {
    # warmup (s+1)/4 | stable | t = 0, 0.25, 0.5, 0.75, 0.875, 1
    "linear": [0.25, 1.0, 1.0, 1.0, 1.0, 0.775, 0.55, 0.325, 0.2125, 0.1],
    # 1 - 0.9 * (1 - cos(pi t)) / 2, cos(pi/4) = 0.70710678, cos(3pi/4) = -0.70710678, cos(7pi/8) = -0.92387953
    "cosine": [0.25, 1.0, 1.0, 1.0, 1.0, 0.86819805, 0.55, 0.23180195, 0.13425421, 0.1],
    # 1 - 0.9 * sqrt(t): sqrt(0.25) = 0.5, sqrt(0.5) = 0.70710678, sqrt(0.75) = 0.8660254, sqrt(0.875) = 0.93541435
    "1-sqrt": [0.25, 1.0, 1.0, 1.0, 1.0, 0.55, 0.36360390, 0.22057714, 0.15812709, 0.1],
}


@pytest.mark.parametrize("shape", list(HAND))
@pytest.mark.parametrize("how", [{"decay_ratio": 0.4}, {"decay_steps": 8, "decay_ratio": 0.9}])
def test_wsd_against_hand_computed_values(shape, how):
    cfg = ScheduleConfig(name="wsd", warmup_steps=4, min_lr_ratio=0.1, decay_shape=shape, **how)
    got = [lr_factor(s, 20, cfg) for s in STEPS]
    assert got == pytest.approx(HAND[shape], abs=1e-7)


def test_a_branched_decay_matches_the_planned_one():
    """Stable for 12 steps as part of a longer plan, then branched: max_steps=20 with an 8-step
    decay gives the same LRs as if 20 steps had been planned from the start, whatever ran before."""
    planned = ScheduleConfig(name="wsd", warmup_steps=4, decay_steps=8)
    stable = ScheduleConfig(name="wsd", warmup_steps=4, decay_steps=8)
    assert [lr_factor(s, 100, stable) for s in range(12)] == [lr_factor(s, 20, planned) for s in range(12)]


@pytest.mark.parametrize("bad, field", [({"decay_steps": 0}, "schedule.decay_steps"),
                                        ({"decay_steps": 2.5}, "schedule.decay_steps"),
                                        ({"decay_shape": "exp"}, "schedule.decay_shape")])
def test_wsd_config_errors_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        ScheduleConfig(name="wsd", **bad)
