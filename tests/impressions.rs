//! Impressions (IMPRESSIONS=redis|kafka): one record per 200 answer of `POST /recommend/{id}` and
//! `GET /recommendations/{id}`, holding exactly the served items, never for errors or anonymous
//! histories; a sink that is down or slow costs no answer. Real redis-server, the real tansu
//! broker, the real binary with the TorchScript test models.

use std::collections::HashMap;
use std::time::Duration;

use testkit::*;

/// A request with its own `x-request-id`: (status, body).
fn call(server: &Server, method: &str, path: &str, request_id: &str) -> (u16, serde_json::Value) {
    let client = reqwest::blocking::Client::new();
    let request = match method {
        "POST" => client.post(server.url(path)),
        _ => client.get(server.url(path)),
    };
    let r = request.header("x-request-id", request_id).send().unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(serde_json::Value::Null))
}

fn profile(rows: &[usize]) -> String {
    serde_json::to_string(&rows.iter().map(|&r| item(r)).collect::<Vec<_>>()).unwrap()
}

/// The stream's entries, oldest first, as field maps.
fn entries(redis: &Redis, stream: &str) -> Vec<HashMap<String, String>> {
    let mut conn = redis.conn();
    let reply: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg(stream).arg("-").arg("+").query(&mut conn).unwrap();
    reply
        .ids
        .into_iter()
        .map(|e| e.map.into_iter().map(|(k, v)| (k, redis::from_redis_value::<String>(v).unwrap())).collect())
        .collect()
}

#[test]
fn every_served_answer_is_one_impression_with_exactly_its_items() {
    let redis = Redis::start();
    redis.set("user_profile:alice", &profile(&[1, 2, 3]));
    redis.set("user_profile:bob", &profile(&[4, 5]));
    let server = Server::start_with(redis.port, test_models(), &[("IMPRESSIONS", "redis")]);
    server.wait_healthy();

    let mut served = Vec::new(); // (request id, user, answer)
    for (n, (method, path, user)) in [
        ("POST", "/recommend/alice?k=5", "alice"),
        ("GET", "/recommendations/alice?k=5", "alice"),
        ("GET", "/recommendations/bob", "bob"),
        ("POST", &format!("/recommend/bob?k=4&exclude={}", item(6)) as &str, "bob"),
        ("POST", "/recommend/carol", "carol"),
        ("GET", "/recommendations/alice?k=3&explain=true", "alice"),
    ]
    .into_iter()
    .enumerate()
    {
        let rid = format!("req-{n}");
        let (status, body) = call(&server, method, path, &rid);
        assert_eq!(status, 200, "{method} {path}: {body}");
        served.push((rid, user.to_string(), body));
    }
    assert_eq!(served[1].2["source"], "cache", "{}", served[1].2);
    assert_eq!(served[2].2["source"], "computed", "{}", served[2].2);
    // no impression: errors, the anonymous POST
    assert_eq!(call(&server, "POST", "/recommend/alice?k=0", "bad-k").0, 400);
    assert_eq!(call(&server, "GET", "/recommendations/bad%20id", "bad-id").0, 400);
    let anonymous = server.post_json(server.port, "/recommend", &serde_json::json!({"history": [item(1)]}), None);
    assert_eq!(anonymous.0, 200, "{}", anonymous.1);

    wait_until(Duration::from_secs(10), || entries(&redis, "recommendation_impressions").len() >= served.len());
    std::thread::sleep(Duration::from_millis(300)); // nothing more arrives
    let logged = entries(&redis, "recommendation_impressions");
    assert_eq!(logged.len(), served.len(), "one impression per 200 answer, none for errors or anonymous histories");
    for ((rid, user, body), entry) in served.iter().zip(&logged) {
        assert_eq!(&entry["request_id"], rid);
        assert_eq!(&entry["user_id"], user);
        assert_eq!(entry["variant"], "default");
        assert_eq!(entry["model_version"], body["model_version"].as_str().unwrap());
        let items: Vec<String> = serde_json::from_str(&entry["items"]).unwrap();
        assert_eq!(items, rec_ids(body), "{rid}: exactly the served items, in order");
        let source = body["source"].as_str().unwrap_or("computed");
        assert_eq!(entry["source"], source, "{rid}");
        assert_eq!(entry["served"], "true");
        assert!(entry["ts_ms"].parse::<u64>().unwrap() > 1_700_000_000_000);
    }
    assert!(!logged[3]["items"].contains(&item(6)), "the excluded item was not served");
    assert_eq!(server.metric("model_service_impressions_total{outcome=\"written\"}"), served.len() as f64);
}

#[test]
fn the_stream_is_capped() {
    let redis = Redis::start();
    redis.set("user_profile:alice", &profile(&[1, 2, 3]));
    let server = Server::start_with(
        redis.port,
        test_models(),
        &[("IMPRESSIONS", "redis"), ("IMPRESSIONS_MAXLEN", "10"), ("IMPRESSIONS_STREAM", "shown")],
    );
    server.wait_healthy();
    for _ in 0..400 {
        assert_eq!(server.post("/recommend/alice").0, 200);
    }
    wait_until(Duration::from_secs(10), || {
        server.metric("model_service_impressions_total{outcome=\"written\"}") >= 400.0
    });
    let len = entries(&redis, "shown").len();
    // approximate trimming keeps whole internal nodes (100 entries each by default)
    assert!((10..=200).contains(&len), "{len} entries kept");
}

#[test]
fn impressions_go_to_the_kafka_topic_and_a_broker_outage_costs_no_answer() {
    let mut kafka = Kafka::start();
    kafka.create_topic("recommendation-impressions", 1);
    let redis = Redis::start();
    for user in ["u1", "u2", "u3"] {
        redis.set(&format!("user_profile:{user}"), &profile(&[1, 7, 9]));
    }
    let brokers = kafka.brokers();
    let server = Server::start_with(
        redis.port,
        test_models(),
        &[("IMPRESSIONS", "kafka"), ("KAFKA_BROKERS", brokers.as_str()), ("IMPRESSIONS_BUFFER", "50")],
    );
    server.wait_healthy();
    let mut answers = HashMap::new();
    for user in ["u1", "u2", "u3"] {
        let (status, body) = call(&server, "POST", &format!("/recommend/{user}"), &format!("kafka-{user}"));
        assert_eq!(status, 200, "{body}");
        answers.insert(format!("kafka-{user}"), body);
    }
    let letters = kafka.read_all("recommendation-impressions", 3, Duration::from_secs(60));
    assert_eq!(letters.len(), 3);
    for (payload, _) in &letters {
        let record: serde_json::Value = serde_json::from_slice(payload).unwrap();
        let answer = &answers[record["request_id"].as_str().unwrap()];
        assert_eq!(record["user_id"], answer["user_id"]);
        assert_eq!(record["variant"], "default");
        assert_eq!(record["source"], "computed");
        assert_eq!(record["served"], true);
        let items: Vec<String> = serde_json::from_value(record["items"].clone()).unwrap();
        assert_eq!(items, rec_ids(answer));
    }

    // the broker goes away: every answer is still 200; the impressions are dropped and counted
    kafka.kill();
    for n in 0..200 {
        let (status, body) = server.post(&format!("/recommend/u{}", 1 + n % 3));
        assert_eq!(status, 200, "answer {n} with the broker down: {body}");
    }
    wait_until(Duration::from_secs(30), || {
        server.metric("model_service_impressions_total{outcome=\"dropped_sink\"}")
            + server.metric("model_service_impressions_total{outcome=\"dropped_full\"}")
            > 0.0
    });
    let dropped = server.metric("model_service_impressions_total{outcome=\"dropped_sink\"}")
        + server.metric("model_service_impressions_total{outcome=\"dropped_full\"}");
    assert!(dropped > 0.0, "undelivered impressions are counted");
    assert_eq!(server.get("/health").0, 200, "a sink outage does not make the service unhealthy");
}
