"""Read-out of an experiment: what each variant showed (impressions) joined with what the users did
afterwards (behaviour events), per variant.

    scripts/py -m model_service_py.experiment_report --redis-url redis://127.0.0.1:6379 \\
        --events events.jsonl --k 20 [--json report.json]

Impressions come from the Redis stream the server writes with IMPRESSIONS=redis (`--stream`,
default recommendation_impressions), or from a JSON-lines file of the same records
(`--impressions FILE`, e.g. the Kafka topic of IMPRESSIONS=kafka dumped by any consumer). Events are
the ingestion's format, one JSON object per line: {"event_id","user_id","item_id","event","ts"}
(ts in Unix milliseconds).

Per variant (served impressions; a shadow set's impressions, served=false, are reported as their
own row): the users measured (an impression and at least one event after their first impression
in that variant), the impressions, and the hit rate@k: per user, the share of their later events
whose item was among the first k items of any of their impressions, averaged over users, with a 95%
confidence interval (normal approximation of the mean). Impressions repeated with the same
request id (a retried write) count once.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class Exposure:
    """One user's impressions in one variant."""
    first_ms: int
    items: set[str] = field(default_factory=set)
    impressions: int = 0


def parse_impression(fields: dict) -> dict:
    """A stream entry (all strings) or a JSON record as one impression."""
    items = fields["items"]
    if isinstance(items, str):
        items = json.loads(items)
    served = fields.get("served", True)
    if isinstance(served, str):
        served = served == "true"
    return {
        "request_id": str(fields.get("request_id", "")),
        "user_id": str(fields["user_id"]),
        "variant": str(fields.get("variant", "default")),
        "items": [str(i) for i in items],
        "served": bool(served),
        "ts_ms": int(fields["ts_ms"]),
    }


def exposures(impressions, k: int) -> dict[str, dict[str, Exposure]]:
    """variant label -> user -> what the user was shown there (a shadow set's label ends in
    ' (shadow)')."""
    seen = set()
    out: dict[str, dict[str, Exposure]] = defaultdict(dict)
    for imp in impressions:
        key = (imp["request_id"], imp["variant"], imp["served"])
        if imp["request_id"] and key in seen:
            continue
        seen.add(key)
        label = imp["variant"] if imp["served"] else f"{imp['variant']} (shadow)"
        exp = out[label].get(imp["user_id"])
        if exp is None:
            exp = out[label][imp["user_id"]] = Exposure(first_ms=imp["ts_ms"])
        exp.first_ms = min(exp.first_ms, imp["ts_ms"])
        exp.items.update(imp["items"][:k])
        exp.impressions += 1
    return out


def mean_ci95(values: list[float]) -> tuple[float, float, float]:
    n = len(values)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    mean = sum(values) / n
    if n == 1:
        return (mean, mean, mean)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = 1.96 * math.sqrt(var / n)
    return (mean, mean - half, mean + half)


def report(impressions, events, k: int) -> dict:
    """{"variants": {label: {"users", "impressions", "hit_rate", "ci95": [lo, hi]}}}."""
    by_user: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for e in events:
        by_user[str(e["user_id"])].append((int(e["ts"]), str(e["item_id"])))
    variants = {}
    for label, users in sorted(exposures(impressions, k).items()):
        rates = []
        for user, exp in users.items():
            later = [item for ts, item in by_user.get(user, ()) if ts > exp.first_ms]
            if later:
                rates.append(sum(item in exp.items for item in later) / len(later))
        mean, lo, hi = mean_ci95(rates)
        variants[label] = {
            "users": len(rates),
            "users_without_later_events": len(users) - len(rates),
            "impressions": sum(exp.impressions for exp in users.values()),
            "hit_rate": mean,
            "ci95": [lo, hi],
        }
    return {"k": k, "variants": variants}


def read_stream(url: str, stream: str, batch: int = 10_000):
    import redis

    r = redis.Redis.from_url(url, decode_responses=True)
    start = "-"
    while True:
        entries = r.xrange(stream, min=start, max="+", count=batch)
        for entry_id, fields in entries:
            yield parse_impression(fields)
        if len(entries) < batch:
            return
        last = entries[-1][0]
        ms, seq = last.split("-")
        start = f"{ms}-{int(seq) + 1}"


def read_jsonl(path: str):
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--redis-url", help="Redis holding the impressions stream")
    source.add_argument("--impressions", help="JSON-lines file of impression records")
    p.add_argument("--stream", default="recommendation_impressions")
    p.add_argument("--events", required=True, help="JSON-lines file of behaviour events")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--json", help="write the report here as JSON")
    args = p.parse_args()
    if args.redis_url:
        impressions = read_stream(args.redis_url, args.stream)
    else:
        impressions = (parse_impression(r) for r in read_jsonl(args.impressions))
    out = report(impressions, read_jsonl(args.events), args.k)
    print(f"{'variant':24s} {'users':>8s} {'impressions':>12s} {'hit rate@' + str(args.k):>12s}  95% CI")
    for label, v in out["variants"].items():
        lo, hi = v["ci95"]
        print(f"{label:24s} {v['users']:8d} {v['impressions']:12d} {v['hit_rate']:12.4f}  [{lo:.4f}, {hi:.4f}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
