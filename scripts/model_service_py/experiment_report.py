"""Read-out of an experiment: what each variant showed (impressions) joined with what the users did
afterwards (behaviour events), per variant.

    scripts/py -m model_service_py.experiment_report --redis-url redis://127.0.0.1:6379 \\
        --events events.jsonl --k 20 [--json report.json]
    scripts/py -m model_service_py.experiment_report --kafka-brokers 127.0.0.1:9092 --k 20

Impressions come from the Redis stream the server writes with IMPRESSIONS=redis (`--stream`,
default recommendation_impressions), from a JSON-lines file of the same records
(`--impressions FILE`), or, with `--kafka-brokers` and neither of those, from the topic the server
writes with IMPRESSIONS=kafka (`--impressions-topic`, default recommendation-impressions). Events are
the ingestion's format, {"event_id","user_id","item_id","event","ts"} (ts in Unix milliseconds):
one JSON object per line of `--events FILE`, or, with `--kafka-brokers` and no `--events`, one per
message of the ingestion's topic (`--events-topic`, default user-behavior).

A topic is read from the beginning of every partition to its end when the read starts (its high
watermarks then), with the partitions assigned directly: no consumer group joins and no offset is
committed. Messages that are not a JSON record of the expected shape are skipped and counted on
stderr. `--kafka-timeout` (30 s) bounds each wait for the broker (metadata, offsets, the next
message); past it the read-out exits with an error. Plaintext brokers by default;
`--kafka-option KEY=VALUE` (repeatable) passes any librdkafka setting (security.protocol, sasl.*,
ssl.*, ...).

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
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

IMPRESSIONS_TOPIC = "recommendation-impressions"  # IMPRESSIONS_TOPIC's default (src/impressions.rs)
EVENTS_TOPIC = "user-behavior"  # KAFKA_TOPIC's default (src/workers/ingest/settings.rs)


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
    # a hit rate lies in [0, 1]: the normal approximation's interval is clipped to it
    return (mean, max(0.0, mean - half), min(1.0, mean + half))


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


class KafkaReadError(Exception):
    """A topic could not be read (broker unreachable, topic missing, a wait past the timeout)."""


def impression_from_message(value: bytes | None) -> dict | None:
    """A message of the impressions topic (one JSON record, served a JSON boolean) as one
    impression; None when it is not one."""
    try:
        record = json.loads(value)
        return parse_impression(record) if isinstance(record, dict) else None
    except (TypeError, ValueError, KeyError):
        return None


def event_from_message(value: bytes | None) -> dict | None:
    """A message of the events topic (the ingestion's JSON event) as an event; None when it has no
    string user_id and item_id or no integer ts."""
    try:
        event = json.loads(value)
    except (TypeError, ValueError):
        return None
    if not isinstance(event, dict):
        return None
    if not (isinstance(event.get("user_id"), str) and isinstance(event.get("item_id"), str)):
        return None
    ts = event.get("ts")
    if not isinstance(ts, int) or isinstance(ts, bool):
        return None
    return event


def kafka_config(brokers: str, options: list[str]) -> dict:
    """The consumer's librdkafka settings: plaintext `brokers`, nothing committed, then each
    KEY=VALUE of `options` (which may override any of them)."""
    config = {
        "bootstrap.servers": brokers,
        # required by the client; with partitions assigned directly no group is joined
        "group.id": "model-service-experiment-report",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        # the start offsets are the low watermarks; should retention remove them meanwhile, start
        # at the new beginning rather than at the end
        "auto.offset.reset": "earliest",
        # librdkafka's own log: critical messages only (an unreachable broker would print a line
        # per reconnect; the error that ends the read says what failed); log_level=6 is its default
        "log_level": 2,
    }
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--kafka-option {option!r}: expected KEY=VALUE")
        config[key.strip()] = value
    return config


def read_topic(config: dict, topic: str, parse, timeout_s: float, label: str):
    """Every message of `topic` from the beginning to the high watermark of each partition at the
    start, parsed by `parse` (None: skipped, counted on stderr). Raises KafkaReadError when the
    broker does not answer within `timeout_s`, the topic is missing, or no message comes for
    `timeout_s` while a partition is short of its end."""
    from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

    try:
        consumer = Consumer(config)
    except (KafkaException, ValueError, TypeError) as e:
        raise KafkaReadError(f"{label}: consumer settings: {e}") from None
    try:
        try:
            meta = consumer.list_topics(topic, timeout=timeout_s)
        except KafkaException as e:
            raise KafkaReadError(
                f"{label}: no answer from the brokers {config['bootstrap.servers']} within {timeout_s:g} s ({e.args[0]})"
            ) from None
        found = meta.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            reason = found.error if found is not None and found.error is not None else "no partitions"
            raise KafkaReadError(f"{label}: topic {topic!r} cannot be read ({reason})")
        ends = {}
        starts = []
        for partition in sorted(found.partitions):
            try:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout_s)
            except KafkaException as e:
                raise KafkaReadError(f"{label}: offsets of {topic} [{partition}]: {e.args[0]}") from None
            if high > low:
                ends[partition] = high
                starts.append(TopicPartition(topic, partition, low))
        if not ends:
            return
        consumer.assign(starts)
        skipped = 0
        last = time.monotonic()
        error = None  # the latest error the client reported (it retries until the timeout)
        while ends:
            msg = consumer.poll(min(1.0, timeout_s))
            if msg is None or (msg.error() is not None and msg.error().code() != KafkaError._PARTITION_EOF):
                if msg is not None:
                    error = msg.error()
                    if error.fatal():
                        raise KafkaReadError(f"{label}: {topic}: {error}")
                if time.monotonic() - last > timeout_s:
                    short = ", ".join(f"[{p}] at {end}" for p, end in sorted(ends.items()))
                    why = f" (last error: {error})" if error is not None else ""
                    raise KafkaReadError(
                        f"{label}: {topic}: no message within {timeout_s:g} s before the end of {short}{why}"
                    )
                continue
            last = time.monotonic()
            partition = msg.partition()
            if msg.error() is not None:  # end of the partition: everything up to the start's end is read
                ends.pop(partition, None)
                continue
            end = ends.get(partition)
            if end is None or msg.offset() >= end:
                continue  # written after the read started
            if msg.offset() >= end - 1:
                del ends[partition]
            record = parse(msg.value())
            if record is None:
                skipped += 1
            else:
                yield record
        if skipped:
            print(f"experiment_report: {topic}: skipped {skipped} malformed message(s)", file=sys.stderr)
    finally:
        consumer.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--redis-url", help="Redis holding the impressions stream")
    source.add_argument("--impressions", help="JSON-lines file of impression records")
    p.add_argument("--stream", default="recommendation_impressions")
    p.add_argument("--events", help="JSON-lines file of behaviour events (default with --kafka-brokers: the events topic)")
    p.add_argument("--kafka-brokers", metavar="HOST:PORT[,...]",
                   help="read impressions and events from Kafka unless --redis-url/--impressions or --events is given")
    p.add_argument("--impressions-topic", default=IMPRESSIONS_TOPIC)
    p.add_argument("--events-topic", default=EVENTS_TOPIC)
    p.add_argument("--kafka-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="longest wait for the broker (metadata, offsets, the next message); default 30")
    p.add_argument("--kafka-option", action="append", default=[], metavar="KEY=VALUE",
                   help="librdkafka setting passed to the consumer (repeatable), e.g. security.protocol=SSL")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--json", help="write the report here as JSON")
    return p


def sources(args: argparse.Namespace) -> tuple[str, str]:
    """Where the impressions ("redis", "file" or "kafka") and the events ("file" or "kafka") come
    from; ValueError when one has no source or the Kafka settings are unusable."""
    if args.redis_url:
        impressions = "redis"
    elif args.impressions:
        impressions = "file"
    elif args.kafka_brokers:
        impressions = "kafka"
    else:
        raise ValueError("impressions: give --redis-url, --impressions or --kafka-brokers")
    if args.events:
        events = "file"
    elif args.kafka_brokers:
        events = "kafka"
    else:
        raise ValueError("events: give --events or --kafka-brokers")
    if args.kafka_brokers is not None and not args.kafka_brokers.strip():
        raise ValueError("--kafka-brokers must not be empty")
    if args.kafka_option and not args.kafka_brokers:
        raise ValueError("--kafka-option needs --kafka-brokers")
    if args.kafka_timeout <= 0:
        raise ValueError("--kafka-timeout must be positive")
    if args.kafka_brokers:
        kafka_config(args.kafka_brokers, args.kafka_option)  # KEY=VALUE checked before any read
    return impressions, events


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        imp_source, ev_source = sources(args)
    except ValueError as e:
        p.error(str(e))
    if imp_source == "redis":
        impressions = read_stream(args.redis_url, args.stream)
    elif imp_source == "file":
        impressions = (parse_impression(r) for r in read_jsonl(args.impressions))
    else:
        impressions = read_topic(kafka_config(args.kafka_brokers, args.kafka_option), args.impressions_topic,
                                 impression_from_message, args.kafka_timeout, "impressions")
    if ev_source == "file":
        events = read_jsonl(args.events)
    else:
        events = read_topic(kafka_config(args.kafka_brokers, args.kafka_option), args.events_topic,
                            event_from_message, args.kafka_timeout, "events")
    try:
        out = report(impressions, events, args.k)
    except KafkaReadError as e:
        sys.exit(f"experiment_report: error: {e}")
    print(f"{'variant':24s} {'users':>8s} {'impressions':>12s} {'hit rate@' + str(args.k):>12s}  95% CI")
    for label, v in out["variants"].items():
        lo, hi = v["ci95"]
        print(f"{label:24s} {v['users']:8d} {v['impressions']:12d} {v['hit_rate']:12.4f}  [{lo:.4f}, {hi:.4f}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
