import math

import pytest

from distributed_resnet.schedule import LRPolicy, step_schedule


@pytest.mark.parametrize("epoch,lr", [(0, 1e-3), (80, 1e-3), (81, 1e-4), (120, 1e-4), (121, 1e-5), (160, 1e-5),
                                      (161, 1e-6), (180, 1e-6), (181, 5e-7), (199, 5e-7)])
def test_step_schedule_table(epoch, lr):
    assert step_schedule(epoch, 1e-3) == pytest.approx(lr)


def test_step_schedule_scales_with_base_lr():
    assert step_schedule(100, 3e-3) == pytest.approx(3e-4)


def _run(policy: LRPolicy, losses):
    lrs, cuts = [], []
    for epoch, loss in enumerate(losses):
        lrs.append(policy.lr(epoch))
        cuts.append(policy.end_epoch(epoch, loss))
    return lrs, cuts


def test_keras_policy_plateau_cuts_never_take_effect():
    policy = LRPolicy(1e-3, "keras", patience=5)
    lrs, cuts = _run(policy, [1.0] + [1.0] * 20)  # no improvement after epoch 0
    assert cuts.index(True) == 5 and sum(cuts) == 4  # cut at the end of epochs 6, 11, 16, 21 (1-based)
    assert policy.state.cuts == [6, 11, 16, 21]
    assert all(lr == pytest.approx(1e-3) for lr in lrs)  # the schedule overwrote every cut


def test_compose_policy_cuts_persist_and_multiply_the_schedule():
    policy = LRPolicy(1e-3, "compose", patience=5)
    lrs, cuts = _run(policy, [1.0] * 12)
    assert lrs[:6] == [pytest.approx(1e-3)] * 6
    assert lrs[6] == pytest.approx(1e-3 * math.sqrt(0.1))
    assert cuts == [False] * 5 + [True] + [False] * 4 + [True, False]
    assert lrs[11] == pytest.approx(1e-3 * 0.1)  # two cuts of sqrt(0.1)
    # The multiplier carries into the step schedule's later stages.
    assert policy.lr(100) == pytest.approx(1e-4 * 0.1)


def test_improvement_resets_patience_with_min_delta():
    policy = LRPolicy(1e-3, "compose", patience=2)
    _, cuts = _run(policy, [1.0, 0.5, 0.49995, 0.4, 0.4, 0.4])  # 0.49995 is within min_delta 1e-4: no improvement
    assert cuts == [False, False, False, False, False, True]


def test_cooldown_and_min_lr():
    policy = LRPolicy(1e-6, "compose", patience=1, cooldown=2, min_lr=0.5e-6)
    lrs, cuts = _run(policy, [1.0] * 8)
    assert cuts[:2] == [False, True]
    assert lrs[2] == pytest.approx(0.5e-6)  # max(1e-6 * sqrt(0.1), min_lr)
    assert not any(cuts[2:])  # cooldown, then at min_lr no further cuts
    assert min(lrs) >= 0.5e-6 - 1e-15


def test_state_roundtrip():
    a = LRPolicy(1e-3, "compose", patience=1)
    _run(a, [1.0, 1.0, 1.0])
    b = LRPolicy(1e-3, "compose", patience=1)
    b.load_state_dict(a.state_dict())
    assert b.lr(3) == a.lr(3) and b.state == a.state


def test_unknown_policy():
    with pytest.raises(ValueError):
        LRPolicy(1e-3, "cosine")
