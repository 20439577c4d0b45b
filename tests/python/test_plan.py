import pytest

import kv_agent as ka
from kv_agent import _core


def test_make_plan_orders_and_positions():
    k = [ka.Hash128.of_str(f"s{i}") for i in range(4)]
    opts = _core.PlanOptions()
    opts.sink_repair_tokens = 2
    plan = _core.make_plan(
        [_core.PlanInput(k[0], 5)],
        [_core.PlanInput(k[2], 4, 0.9, 20), _core.PlanInput(k[1], 3, 0.1, 10)],
        [_core.PlanInput(k[3], 2, 0.0, 30)],
        6,
        opts,
    )
    assert [s.key for s in plan.segments] == [k[0], k[1], k[2], k[3]]
    assert [s.position for s in plan.segments] == [0, 5, 8, 12]
    assert [s.recompute_tokens for s in plan.segments] == [0, 2, 2, 0]
    assert plan.new_tokens_position == 14
    assert plan.reused_tokens == 5 + 1 + 2 + 2
    assert plan.recomputed_tokens == 2 + 2 + 6


def test_make_plan_errors():
    opts = _core.PlanOptions()
    opts.max_context = 3
    with pytest.raises(ka.ResourceExhaustedError):
        _core.make_plan([_core.PlanInput(ka.Hash128.of_str("p"), 5)], [], [], 1, opts)
