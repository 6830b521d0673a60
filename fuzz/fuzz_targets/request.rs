//! The request path end to end: an arbitrary POST /recommend/<id>?<query> (id, query, body, token,
//! and the profile stored for that id) through the real router, a real redis-server and the
//! shipped TorchScript models. Whatever the input: no panic, no 5xx, a JSON body with `error` and
//! `detail` on every refusal, and Redis holds either the complete answer or nothing.
#![no_main]

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::Arbitrary;
use axum::body::Body;
use axum::http::{Method, Request};
use clap::Parser;
use libfuzzer_sys::fuzz_target;
use model_service::config::Cli;
use model_service::api::routes::{router, Access, Routes};
use tower::ServiceExt;

const TOKEN: &str = "fuzz-token";

#[derive(Arbitrary, Debug)]
enum Token {
    Right,
    Wrong(String),
    Missing,
}

#[derive(Arbitrary, Debug)]
enum Profile {
    Raw(Vec<u8>),
    Rows(Vec<u16>),
    Missing,
}

#[derive(Arbitrary, Debug)]
struct Input {
    user: Vec<u8>,
    query: Vec<u8>,
    /// The stored profile: raw bytes, or catalog rows written as a JSON array of their ASINs (so
    /// the models run), or none.
    profile: Profile,
    body: Vec<u8>,
    token: Token,
    get_instead_of_post: bool,
}

struct Harness {
    runtime: tokio::runtime::Runtime,
    app: axum::Router,
    client: redis::Client,
    redis: std::sync::Mutex<redis::Connection>,
    asins: Vec<String>,
}

impl Harness {
    /// Runs an idempotent Redis operation of the harness itself; libFuzzer's timer signal can
    /// interrupt a blocking read (EINTR), so a failed attempt is retried on a fresh connection.
    fn redis<T>(&self, op: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>) -> T {
        let mut conn = self.redis.lock().unwrap();
        for _ in 0..20 {
            match op(&mut conn) {
                Ok(v) => return v,
                Err(_) => {
                    if let Ok(fresh) = self.client.get_connection() {
                        *conn = fresh;
                    }
                }
            }
        }
        panic!("the harness cannot reach its redis-server");
    }
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null());
        // SAFETY: prctl is async-signal-safe; redis-server dies with the fuzzer.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        cmd.spawn().expect("redis-server must be installed");
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let mut conn = None;
        for _ in 0..100 {
            match client.get_connection() {
                Ok(c) => {
                    conn = Some(c);
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        let conn = conn.expect("redis-server did not start");
        let model_dir = std::env::var("FUZZ_MODEL_DIR")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../model_output").into());
        let asins = std::fs::read_to_string(format!("{model_dir}/catalog.tsv"))
            .expect("catalog.tsv")
            .lines()
            .map(|l| l.split('\t').next().unwrap_or_default().to_string())
            .collect();
        let port = port.to_string();
        let args = ["model-service", "--redis-host", "127.0.0.1", "--redis-port", &port, "--model-dir", &model_dir];
        let cli = Cli::try_parse_from(args.iter().copied().chain([
            "--device",
            "cpu",
            "--inference-workers",
            "1",
            "--torch-threads",
            "1",
            "serve",
        ]))
        .unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let app = runtime.block_on(async {
            let service = model_service::app::build_service(&cli.config).unwrap();
            service.engine.ready().await.expect("the models load");
            let access = Access {
                api_token: Some(TOKEN.into()),
                max_header_bytes: 8192,
                body_read_timeout: std::time::Duration::from_secs(10),
                history_body_limit: 16 * 1024,
            };
            router(Arc::clone(&service), Routes::Api { admin: false }, &access)
        });
        Harness { runtime, app, client, redis: std::sync::Mutex::new(conn), asins }
    })
}

/// Percent-encodes everything but unreserved characters (and `=`/`&` in a query).
fn encode(bytes: &[u8], keep: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fuzz_target!(|input: Input| {
    let h = harness();
    let user = String::from_utf8(input.user.clone()).ok();
    let rec_key = |u: &str| format!("recommendations:{u}");
    if let Some(u) = &user {
        let mut pipe = redis::pipe();
        pipe.del(rec_key(u)).ignore();
        let key = format!("user_profile:{u}");
        match &input.profile {
            Profile::Raw(p) => pipe.set(key, p.as_slice()).ignore(),
            Profile::Rows(rows) => {
                let ids: Vec<&str> = rows.iter().map(|&r| h.asins[r as usize % h.asins.len()].as_str()).collect();
                pipe.set(key, serde_json::to_vec(&ids).unwrap()).ignore()
            }
            Profile::Missing => pipe.del(key).ignore(),
        };
        h.redis(|c| pipe.query::<()>(c));
    }
    let mut uri = format!("/recommend/{}", encode(&input.user, b""));
    if !input.query.is_empty() {
        uri.push('?');
        uri.push_str(&encode(&input.query, b"=&"));
    }
    let method = if input.get_instead_of_post { Method::GET } else { Method::POST };
    let mut request = Request::builder().method(method.clone()).uri(&uri);
    match &input.token {
        Token::Right => request = request.header("authorization", format!("Bearer {TOKEN}")),
        Token::Wrong(t) => {
            if let Ok(v) = axum::http::HeaderValue::from_str(&format!("Bearer {t}")) {
                request = request.header("authorization", v);
            }
        }
        Token::Missing => {}
    }
    let request = request.header("content-length", input.body.len()).body(Body::from(input.body.clone())).unwrap();

    let (status, body) = h.runtime.block_on(async {
        let response = h.app.clone().oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, bytes)
    });
    assert!([200, 400, 401, 404, 405, 413, 422, 431].contains(&status), "status {status} for {uri}: {body:?}");
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"));
    if matches!(input.token, Token::Right) && method == Method::POST {
        assert_ne!(status, 401);
    }
    let stored: Option<String> =
        user.as_ref().and_then(|u| h.redis(|c| redis::cmd("GET").arg(rec_key(u)).query::<Option<String>>(c)));
    if status == 200 {
        let u = user.expect("a 200 answer needs a UTF-8 user id");
        assert_eq!(json["user_id"], u.as_str());
        let ids: Vec<String> = json["recommendations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["item_id"].as_str().unwrap().to_string())
            .collect();
        assert!(!ids.is_empty() && ids.len() <= 100, "{json}");
        let stored: Vec<String> = serde_json::from_str(&stored.expect("a 200 answer is in Redis")).unwrap();
        assert_eq!(stored, ids, "Redis holds exactly the answer");
    } else {
        assert!(json["error"].as_str().is_some_and(|e| !e.is_empty()), "{json}");
        assert!(json["detail"].as_str().is_some_and(|d| !d.is_empty()), "{json}");
        assert!(stored.is_none(), "a refused request wrote recommendations: {json}");
    }
});
