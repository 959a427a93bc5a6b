"""Adaptive batching: bounded ladder, hysteresis, cooldown, events; reading the metrics port."""
import math

import pytest

from ragstack.governance.adaptive import (LADDERS, Controller, Rung, Sample, buckets, config_override, histogram_p95,
                               parse_prometheus, value)


def controller(**kw):
    now = [0.0]
    c = Controller("embed", LADDERS["embed"], p95_target_ms=100.0, cooldown_s=10.0, clock=lambda: now[0], **kw)
    return c, now


def busy(p95=50.0, headroom=0.5, depth=20):
    return Sample(queue_depth=depth, p95_ms=p95, headroom=headroom)


def test_starts_small_and_ramps_with_queue_depth_after_consecutive_samples():
    c, now = controller()
    assert c.rung == LADDERS["embed"][0]
    assert c.observe(busy()) is None and c.observe(busy()) is None
    event = c.observe(busy())
    assert event["direction"] == "up" and event["reason"] == "queue_depth"
    assert event["to"] == {"preferred": [4, 8, 16], "delay_us": 2000}
    assert c.step == 1


def test_a_short_queue_or_a_slowish_p95_does_not_ramp():
    c, _ = controller()
    for _ in range(10):
        assert c.observe(busy(depth=3)) is None                  # under the largest preferred size (8)
        assert c.observe(busy(p95=90.0)) is None                 # over 0.8 x target: no ramp
    assert c.step == 0


def test_cooldown_and_bounds():
    c, now = controller()
    for _ in range(3):
        c.observe(busy())
    assert c.step == 1
    for _ in range(5):
        assert c.observe(busy()) is None                          # within the cooldown
    now[0] = 11.0
    assert c.observe(busy())["to"]["preferred"] == [8, 16, 32]
    now[0] = 30.0
    for _ in range(10):
        assert c.observe(busy()) is None                          # top of the ladder
    assert c.step == len(LADDERS["embed"]) - 1


def test_backs_off_on_p95_or_memory_and_never_below_the_first_rung():
    c, now = controller(step=2)
    assert c.observe(busy(p95=150.0)) is None                     # one slow sample is not enough
    event = c.observe(busy(p95=150.0))
    assert (event["direction"], event["reason"]) == ("down", "p95_over_target")
    now[0] = 20.0
    event = c.observe(busy(headroom=0.05))                        # memory pressure acts at once
    assert event["reason"] == "memory_headroom" and c.step == 0
    now[0] = 40.0
    for _ in range(5):
        assert c.observe(busy(p95=500.0, headroom=0.01)) is None
    assert c.step == 0


def test_hysteresis_a_measurement_hovering_at_the_target_does_not_oscillate():
    c, now = controller(step=1)
    events = []
    for i in range(40):
        now[0] += 20.0                                            # past every cooldown
        p95 = 99.0 if i % 2 else 101.0                            # alternating just under / over the target
        events.append(c.observe(busy(p95=p95)))
    assert [e for e in events if e] == []                        # never twice in a row over, never fast enough


def test_headroom_margin_blocks_the_ramp():
    c, _ = controller()
    for _ in range(5):
        assert c.observe(busy(headroom=0.12)) is None             # over the floor, under floor + margin
    assert c.gauges() == {"step": 0, "max_preferred_batch": 8, "queue_delay_us": 0, "changes": 0}


def test_config_override_keeps_priority_settings():
    cfg = {"name": "embed", "dynamic_batching": {"priority_levels": 2, "default_priority_level": 1,
                                                 "preferred_batch_size": [4]}}
    out = config_override(cfg, Rung((8, 16), 3000))
    assert out["dynamic_batching"] == {"priority_levels": 2, "default_priority_level": 1,
                                       "preferred_batch_size": [8, 16], "max_queue_delay_microseconds": 3000}
    assert cfg["dynamic_batching"]["preferred_batch_size"] == [4]


TEXT = """# HELP nv_inference_pending_request_count Instantaneous number of pending requests
nv_inference_pending_request_count{model="embed",version="1"} 3
nv_inference_pending_request_count{model="rerank",version="1"} 0
llm_stage_latency_us_bucket{stage="embed",le="1000"} 10
llm_stage_latency_us_bucket{stage="embed",le="5000"} 18
llm_stage_latency_us_bucket{stage="embed",le="+Inf"} 20
llm_memory_headroom_bytes{component="triton"} 2.5e+09
"""


def test_reading_the_metrics_port():
    samples = parse_prometheus(TEXT)
    assert value(samples, "nv_inference_pending_request_count", model="embed") == 3
    assert value(samples, "llm_memory_headroom_bytes") == 2.5e9
    assert value(samples, "missing") is None
    after = buckets(samples, "llm_stage_latency_us", stage="embed")
    assert after == {1000.0: 10, 5000.0: 18, math.inf: 20}
    before = {1000.0: 10, 5000.0: 10, math.inf: 10}
    assert histogram_p95(before, after) == math.inf               # 8 of 10 new ones under 5 ms: p95 is over it
    assert histogram_p95({1000.0: 0, 5000.0: 0, math.inf: 0}, {1000.0: 19, 5000.0: 20, math.inf: 20}) == 1000.0
    assert histogram_p95(after, after) is None


def test_empty_ladder_is_refused():
    with pytest.raises(ValueError):
        Controller("x", (), p95_target_ms=1.0)
