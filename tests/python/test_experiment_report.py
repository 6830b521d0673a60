"""The experiment read-out's join of impressions with later events (model_service_py.experiment_report),
and its Kafka source, tested without a broker."""

import json
import math
import time

import pytest

from model_service_py import experiment_report as er
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


# --- Kafka source (no broker: the parsing, the argument checks, and the read against a fake client)

def test_impression_message_is_one_json_record_with_a_boolean_served():
    value = json.dumps({
        "request_id": "r1", "user_id": "u1", "variant": "control", "model_version": "v", "items": ["a", 2],
        "source": "cache", "served": False, "ts_ms": 1700000000000,
    }).encode()
    assert er.impression_from_message(value) == {
        "request_id": "r1", "user_id": "u1", "variant": "control", "items": ["a", "2"], "served": False,
        "ts_ms": 1700000000000,
    }
    for bad in [None, b"", b"not json", b"\xff\xfe", b"[1]", b'{"items": []}',
                b'{"user_id": "u", "items": 5, "ts_ms": 1}', b'{"user_id": "u", "items": [], "ts_ms": "x"}']:
        assert er.impression_from_message(bad) is None, bad


def test_event_message_needs_string_ids_and_an_integer_ts():
    good = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "event": "view", "ts": 1700000000000}
    assert er.event_from_message(json.dumps(good).encode()) == good
    for bad in [None, b"", b"{", b'"text"', b"[]",
                json.dumps({**good, "item_id": 5}).encode(),
                json.dumps({**good, "ts": "1700000000000"}).encode(),
                json.dumps({**good, "ts": True}).encode(),
                json.dumps({k: v for k, v in good.items() if k != "user_id"}).encode()]:
        assert er.event_from_message(bad) is None, bad


def sources_of(*argv):
    return er.sources(er.build_parser().parse_args(list(argv)))


def test_sources_kafka_fills_in_what_no_other_option_gives():
    assert sources_of("--kafka-brokers", "b:9092") == ("kafka", "kafka")
    assert sources_of("--kafka-brokers", "b:9092", "--events", "e.jsonl") == ("kafka", "file")
    assert sources_of("--kafka-brokers", "b:9092", "--impressions", "i.jsonl") == ("file", "kafka")
    assert sources_of("--kafka-brokers", "b:9092", "--redis-url", "redis://r") == ("redis", "kafka")
    assert sources_of("--redis-url", "redis://r", "--events", "e.jsonl") == ("redis", "file")
    assert sources_of("--impressions", "i.jsonl", "--events", "e.jsonl") == ("file", "file")
    args = er.build_parser().parse_args(["--kafka-brokers", "b:9092"])
    assert (args.impressions_topic, args.events_topic, args.kafka_timeout) == (
        "recommendation-impressions", "user-behavior", 30.0)


@pytest.mark.parametrize("argv, message", [
    ([], "give --redis-url, --impressions or --kafka-brokers"),
    (["--events", "e.jsonl"], "give --redis-url, --impressions or --kafka-brokers"),
    (["--redis-url", "redis://r"], "give --events or --kafka-brokers"),
    (["--impressions", "i.jsonl"], "give --events or --kafka-brokers"),
    (["--kafka-brokers", " "], "--kafka-brokers must not be empty"),
    (["--impressions", "i", "--events", "e", "--kafka-option", "a=b"], "--kafka-option needs --kafka-brokers"),
    (["--kafka-brokers", "b:9092", "--kafka-timeout", "0"], "--kafka-timeout must be positive"),
    (["--kafka-brokers", "b:9092", "--kafka-option", "novalue"], "expected KEY=VALUE"),
])
def test_missing_or_unusable_sources_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        er.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_kafka_config_commits_nothing_and_options_override():
    config = er.kafka_config("b1:9092,b2:9092", ["security.protocol=SASL_SSL", "sasl.password=a=b", "log_level=6"])
    assert config["bootstrap.servers"] == "b1:9092,b2:9092"
    assert config["enable.auto.commit"] is False and config["enable.auto.offset.store"] is False
    assert config["security.protocol"] == "SASL_SSL"
    assert config["sasl.password"] == "a=b"  # split at the first '='
    assert config["log_level"] == "6"


class FakeMessage:
    def __init__(self, partition, offset, value=None, error=None):
        self._partition, self._offset, self._value, self._error = partition, offset, value, error

    def partition(self):
        return self._partition

    def offset(self):
        return self._offset

    def value(self):
        return self._value

    def error(self):
        return self._error


class FakeConsumer:
    """Stands in for confluent_kafka.Consumer: `topics` maps a topic to its partitions' messages
    (values, offsets from `low`), `later` to messages written after the watermarks were read."""

    topics: dict = {}
    low: int = 0
    later: dict = {}
    stall: bool = False
    unreachable: bool = False
    instances: list = []

    def __init__(self, config):
        self.config = config
        self.queue = []
        self.closed = False
        FakeConsumer.instances.append(self)

    def list_topics(self, topic, timeout):
        from confluent_kafka import KafkaError, KafkaException

        if self.unreachable:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))

        class Topic:
            def __init__(self, partitions, error=None):
                self.partitions, self.error = partitions, error

        class Meta:
            pass

        meta = Meta()
        if topic in self.topics:
            meta.topics = {topic: Topic({p: object() for p in range(len(self.topics[topic]))})}
        else:
            meta.topics = {topic: Topic({}, KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))}
        return meta

    def get_watermark_offsets(self, tp, timeout):
        return self.low, self.low + len(self.topics[tp.topic][tp.partition])

    def assign(self, partitions):
        from confluent_kafka import KafkaError

        self.assigned = [(tp.partition, tp.offset) for tp in partitions]
        for tp in partitions:
            values = self.topics[tp.topic][tp.partition] + self.later.get(tp.topic, {}).get(tp.partition, [])
            if self.stall:
                values = values[:1]
            for i, value in enumerate(values):
                self.queue.append(FakeMessage(tp.partition, self.low + i, value))
            if not self.stall:
                self.queue.append(FakeMessage(tp.partition, self.low + len(values), None,
                                              KafkaError(KafkaError._PARTITION_EOF)))

    def poll(self, timeout):
        if self.queue:
            return self.queue.pop(0)
        time.sleep(min(timeout, 0.01))
        return None

    def close(self):
        self.closed = True


@pytest.fixture
def fake_kafka(monkeypatch):
    confluent_kafka = pytest.importorskip("confluent_kafka")
    monkeypatch.setattr(confluent_kafka, "Consumer", FakeConsumer)
    monkeypatch.setattr(FakeConsumer, "instances", [])
    monkeypatch.setattr(FakeConsumer, "later", {})
    monkeypatch.setattr(FakeConsumer, "stall", False)
    monkeypatch.setattr(FakeConsumer, "unreachable", False)
    monkeypatch.setattr(FakeConsumer, "low", 0)
    return FakeConsumer


def ev(user, item, ts):
    return json.dumps({"event_id": f"{user}-{ts}", "user_id": user, "item_id": item, "event": "view", "ts": ts}).encode()


def test_read_topic_reads_every_partition_to_its_end_at_the_start(fake_kafka, capsys):
    fake_kafka.low = 7  # retention removed the first offsets
    fake_kafka.topics = {"t": [[ev("a", "x", 1), b"junk", ev("a", "y", 2)], [], [ev("b", "z", 3)]]}
    fake_kafka.later = {"t": {0: [ev("late", "x", 4)], 2: [ev("late", "y", 5)]}}
    config = er.kafka_config("b:9092", [])
    got = list(er.read_topic(config, "t", er.event_from_message, 1.0, "events"))
    assert sorted((e["user_id"], e["item_id"]) for e in got) == [("a", "x"), ("a", "y"), ("b", "z")]
    (consumer,) = fake_kafka.instances
    assert consumer.assigned == [(0, 7), (2, 7)]  # the empty partition is not read
    assert consumer.closed
    assert consumer.config["enable.auto.commit"] is False
    assert "t: skipped 1 malformed message(s)" in capsys.readouterr().err


def test_read_topic_errors_instead_of_hanging(fake_kafka):
    config = er.kafka_config("b:9092", [])
    fake_kafka.topics = {"t": [[ev("a", "x", 1), ev("a", "y", 2)]]}
    fake_kafka.stall = True  # the second message never comes
    start = time.monotonic()
    with pytest.raises(er.KafkaReadError, match=r"no message within 0.2 s before the end of \[0\] at 2"):
        list(er.read_topic(config, "t", er.event_from_message, 0.2, "events"))
    assert time.monotonic() - start < 5
    with pytest.raises(er.KafkaReadError, match="topic 'missing' cannot be read"):
        list(er.read_topic(config, "missing", er.event_from_message, 0.2, "events"))
    fake_kafka.unreachable = True
    with pytest.raises(er.KafkaReadError, match="no answer from the brokers b:9092 within 0.2 s"):
        list(er.read_topic(config, "t", er.event_from_message, 0.2, "events"))
    assert all(c.closed for c in fake_kafka.instances)


def kafka_impression(request_id, user, variant, items, ts, served=True):
    return json.dumps({"request_id": request_id, "user_id": user, "variant": variant, "model_version": "v",
                       "items": items, "source": "computed", "served": served, "ts_ms": ts}).encode()


def test_main_reads_both_topics_with_kafka_brokers(fake_kafka, tmp_path):
    fake_kafka.topics = {
        "recommendation-impressions": [
            [kafka_impression("r1", "a", "control", ["x", "y", "z"], 100),
             kafka_impression("r1", "a", "control", ["x", "y", "z"], 100)],
            [kafka_impression("r2", "b", "control", ["p", "q"], 100)],
        ],
        "user-behavior": [[ev("a", "x", 150), ev("a", "z", 160)], [ev("b", "q", 200)]],
    }
    out = tmp_path / "report.json"
    er.main(["--kafka-brokers", "b:9092", "--k", "2", "--json", str(out)])
    control = json.loads(out.read_text())["variants"]["control"]
    assert (control["users"], control["impressions"]) == (2, 2)
    assert math.isclose(control["hit_rate"], (0.5 + 1.0) / 2)
    assert {c.config["bootstrap.servers"] for c in fake_kafka.instances} == {"b:9092"}


def test_main_exits_nonzero_with_the_reason_when_the_broker_is_unreachable(fake_kafka, capsys):
    fake_kafka.topics = {}
    fake_kafka.unreachable = True
    with pytest.raises(SystemExit) as exit_:
        er.main(["--kafka-brokers", "b:9092", "--kafka-timeout", "0.1"])
    assert exit_.value.code not in (0, None)
    assert "no answer from the brokers b:9092" in str(exit_.value.code)
