"""The experiment read-out's join of impressions with later events (model_service_py.experiment_report)."""

import json
import math

from model_service_py.experiment_report import parse_impression, report


def imp(request_id, user, variant, items, ts, served=True):
    # as the Redis stream holds it: every field a string
    return parse_impression({
        "request_id": request_id, "user_id": user, "variant": variant, "model_version": "v",
        "items": json.dumps(items), "source": "computed", "served": "true" if served else "false",
        "ts_ms": str(ts),
    })


def test_hit_rate_counts_only_later_events_on_impressed_items_within_k():
    impressions = [
        imp("r1", "a", "control", ["x", "y", "z"], 100),
        imp("r1", "a", "control", ["x", "y", "z"], 100),  # the same request written twice: once
        imp("r2", "b", "control", ["p", "q"], 100),
        imp("r3", "c", "treatment", ["m", "n"], 100),
        imp("r4", "c", "shadow", ["n", "o"], 100, served=False),
        imp("r5", "d", "treatment", ["s"], 100),  # no later event: not measured
    ]
    events = [
        {"user_id": "a", "item_id": "x", "ts": 50},   # before the impression: ignored
        {"user_id": "a", "item_id": "x", "ts": 150},  # hit
        {"user_id": "a", "item_id": "z", "ts": 160},  # rank 3 > k=2: miss
        {"user_id": "b", "item_id": "q", "ts": 200},  # hit
        {"user_id": "c", "item_id": "n", "ts": 300},  # hit for treatment and for the shadow
        {"user_id": "c", "item_id": "o", "ts": 310},  # miss for treatment, hit for the shadow
    ]
    out = report(impressions, events, k=2)["variants"]
    assert out["control"]["impressions"] == 2
    assert out["control"]["users"] == 2
    assert math.isclose(out["control"]["hit_rate"], (0.5 + 1.0) / 2)
    lo, hi = out["control"]["ci95"]
    assert lo < out["control"]["hit_rate"] < hi
    assert out["treatment"]["users"] == 1 and out["treatment"]["users_without_later_events"] == 1
    assert math.isclose(out["treatment"]["hit_rate"], 0.5)
    assert math.isclose(out["shadow (shadow)"]["hit_rate"], 1.0)
