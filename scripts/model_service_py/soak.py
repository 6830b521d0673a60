#!/usr/bin/env python3
"""Soak test: minutes of mixed load against the real binary and a real redis-server, with bad
requests, a Redis restart in the middle and a model reload, then a verdict.

It starts its own redis-server (append-only file, fsync on every write, so a restart loses nothing
Redis acknowledged) and model-service (release binary, API_TOKEN, ADMIN_PORT), writes profiles
(Amazon-Book training histories with --data, else random histories over the catalog) plus
deliberately malformed ones, and drives POST /recommend from --clients threads for --seconds:

  valid users                      -> 200 (503 redis_unavailable while Redis is down)
  malformed profiles (4 kinds)     -> 422 invalid_profile
  bad ids, bad k                   -> 400 invalid_user_id / invalid_k
  no token / oversized body        -> 401 unauthorized / 413 payload_too_large
  oversized headers / unknown path -> 431 headers_too_large / 404 not_found
  profiles over MAX_PROFILE_BYTES  -> 422 profile_too_large

Attack phase: before the service starts, a start with an empty API_TOKEN must be refused (exit
status 1, one line). From 30% to 45% of the run --attack-sockets sockets (more than the
service's MAX_CONNECTIONS) are held open, half idle and half sending a request head one byte a
second (slowloris), re-opened as the service closes them; meanwhile /health/live is probed twice
a second and must answer within 2 s every time.

At 50% of the run Redis is killed (SIGKILL) and restarted on the same port after --redis-down
seconds; at 70% the models are reloaded through the admin port. Memory (VmRSS) of the service is
sampled every 5 s. The verdict, printed and written as JSON (--out):

  * memory: RSS at the end within 10% of RSS after warm-up (the sample at --warmup seconds);
  * lost writes: for every user that got a 200, recommendations:<user> holds exactly the ids of
    that answer (profiles do not change during the run, so every answer for a user is the same);
    a user whose answers differed is counted too. Users that only got errors must have no list;
  * errors: counts by (status, error code); any answer that is not one of the deliberate ones
    above (e.g. a 500, a 503 while Redis was up, a broken connection, a /health/live probe that
    failed during the attack) is unexpected;
  * attack: the empty-token start was refused, and the service closed attack sockets.

Exit status 0 when all hold. Run it through scripts/soak.sh.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import redis

from . import REPO as ROOT

TOKEN = "soak-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class RedisServer:
    def __init__(self, port: int, workdir: str):
        self.port, self.workdir, self.proc = port, workdir, None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.workdir,
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def profiles(args, catalog: list[str]) -> dict[str, list[str]]:
    rng = random.Random(7)
    if args.data:
        from . import data as ds
        d = ds.load(args.data)
        picked = rng.sample(range(d.num_users), min(args.users, d.num_users))
        return {d.users[u]: [d.asins[i] for i in d.train[u]] for u in picked}
    return {f"soak{u}": rng.sample(catalog, rng.randint(1, 60)) for u in range(args.users)}


class Load:
    """The request mix; every answer is classified and recorded."""

    def __init__(self, port: int, users: list[str], malformed: list[str], long_users: list[str],
                 huge_users: list[str]):
        self.port, self.users, self.malformed, self.long_users = port, users, malformed, long_users
        self.huge_users = huge_users
        self.lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()
        self.unexpected: list[dict] = []
        self.answers: dict[str, set] = collections.defaultdict(set)  # user -> distinct id lists (200s)
        self.redis_down = threading.Event()
        self.stop = threading.Event()

    def kinds(self, rng: random.Random):
        r = rng.random()
        if r < 0.80:
            pool = self.long_users if rng.random() < 0.05 else self.users
            return "valid", f"/recommend/{rng.choice(pool)}", {}, None
        if r < 0.85:
            return "malformed", f"/recommend/{rng.choice(self.malformed)}", {}, None
        if r < 0.89:
            bad = rng.choice(["x" * 200, "a%20b", "new%0Aline", "%FF%FE", "%00"])
            return "bad_id", f"/recommend/{bad}", {}, None
        if r < 0.92:
            k = rng.choice(["0", "abc", "100000", "-5", "1e9"])
            return "bad_k", f"/recommend/{rng.choice(self.users)}?k={k}", {}, None
        if r < 0.94:
            return "no_token", f"/recommend/{rng.choice(self.users)}", {"Authorization": ""}, None
        if r < 0.96:
            return "big_body", f"/recommend/{rng.choice(self.users)}", {}, b"x" * 40_000
        if r < 0.975:
            return "big_headers", f"/recommend/{rng.choice(self.users)}", {"X-Padding": "p" * 9000}, None
        if r < 0.985:
            return "oversized_profile", f"/recommend/{rng.choice(self.huge_users)}", {}, None
        return "no_route", "/recommendz", {}, None

    EXPECTED = {
        "valid": {(200, None)},
        "malformed": {(422, "invalid_profile")},
        "bad_id": {(400, "invalid_user_id")},
        "bad_k": {(400, "invalid_k")},
        "no_token": {(401, "unauthorized")},
        "big_body": {(413, "payload_too_large")},
        "big_headers": {(431, "headers_too_large")},
        "oversized_profile": {(422, "profile_too_large")},
        "no_route": {(404, "not_found"), (405, "method_not_allowed")},
    }

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stop.is_set():
            kind, path, headers, body = self.kinds(rng)
            hdrs = {"Authorization": f"Bearer {TOKEN}", **headers}
            if not hdrs["Authorization"]:
                del hdrs["Authorization"]
            down = self.redis_down.is_set()
            try:
                conn.request("POST", path, body=body, headers=hdrs)
                resp = conn.getresponse()
                raw = resp.read()
                status = resp.status
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                self.record(kind, "connection_error", None, {"kind": kind, "path": path[:80], "error": repr(e)})
                continue
            try:
                payload = json.loads(raw) if raw else {}
            except ValueError:
                payload = {}
            code = payload.get("error") if status != 200 else None
            ok = (status, code) in self.EXPECTED[kind]
            # Redis down (or just back): 503 redis_unavailable is the deliberate answer.
            if not ok and (status, code) == (503, "redis_unavailable") and (down or self.redis_down.is_set()
                                                                          or time.time() < self.back_until):
                ok = True
            detail = None if ok else {"kind": kind, "path": path[:80], "status": status, "body": raw[:300].decode(
                "utf-8", "replace")}
            self.record(kind, status, code, detail)
            if status == 200 and kind == "valid":
                user = payload["user_id"]
                ids = tuple(r["item_id"] for r in payload["recommendations"])
                with self.lock:
                    self.answers[user].add(ids)

    back_until = 0.0

    def record(self, kind, status, code, unexpected) -> None:
        with self.lock:
            self.counts[(kind, status, code)] += 1
            if unexpected:
                self.unexpected.append(unexpected)


def empty_token_refused(binary: str, env: dict) -> dict:
    """A start with API_TOKEN set but empty must fail at once: exit status 1, one line."""
    out = {}
    for token in ("", "  "):
        proc = subprocess.run([binary, "serve"], env={**env, "API_TOKEN": token, "PORT": str(free_port())},
                              capture_output=True, text=True, timeout=60)
        lines = proc.stderr.strip().splitlines()
        out[repr(token)] = {"exit": proc.returncode, "stderr": lines,
                            "refused": proc.returncode == 1 and len(lines) == 1 and "API_TOKEN" in lines[0]}
    return out


class Attack:
    """Idle and slowloris sockets held open against the service, and /health/live probes."""

    def __init__(self, port: int, sockets: int):
        self.port, self.sockets = port, sockets
        self.stop = threading.Event()
        self.opened = self.closed_by_server = self.probes = 0
        self.probe_failures: list[str] = []

    def hold(self) -> None:
        held: list[tuple[socket.socket, bool]] = []
        while not self.stop.is_set():
            while len(held) < self.sockets and not self.stop.is_set():
                try:
                    s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
                except OSError:
                    break
                s.setblocking(False)
                slow = len(held) % 2 == 1
                if slow:
                    s.send(b"POST /recommend/slowloris HTTP/1.1\r\nHost: soak\r\nX-Slow: ")
                held.append((s, slow))
                self.opened += 1
            alive = []
            for s, slow in held:
                try:
                    if s.recv(4096) == b"":
                        raise ConnectionResetError
                    alive.append((s, slow))  # (never answered: the head is never complete)
                except BlockingIOError:
                    try:
                        if slow:
                            s.send(b"x")
                        alive.append((s, slow))
                    except OSError:
                        self.closed_by_server += 1
                        s.close()
                except OSError:
                    self.closed_by_server += 1
                    s.close()
            held = alive
            time.sleep(1.0)
        for s, _ in held:
            s.close()

    def probe(self) -> None:
        while not self.stop.is_set():
            self.probes += 1
            t = time.time()
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/health/live")
                status = c.getresponse().status
                c.close()
                if status != 200:
                    self.probe_failures.append(f"status {status}")
            except (OSError, http.client.HTTPException) as e:
                self.probe_failures.append(f"{e!r} after {time.time() - t:.1f}s")
            time.sleep(0.5)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True)
    p.add_argument("--model-dir", default=os.path.join(ROOT, "model_output"))
    p.add_argument("--data", help="Amazon-Book directory (real histories); default: random histories")
    p.add_argument("--seconds", type=int, default=600)
    p.add_argument("--warmup", type=int, default=60, help="RSS baseline taken this many seconds in")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--users", type=int, default=5000)
    p.add_argument("--redis-down", type=float, default=3.0, help="seconds Redis stays down")
    p.add_argument("--max-connections", type=int, default=256, help="the service's MAX_CONNECTIONS")
    p.add_argument("--attack-sockets", type=int, default=400, help="idle and slowloris sockets held")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "soak.json"))
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="soak-")
    rport, port, aport = free_port(), free_port(), free_port()
    rs = RedisServer(rport, work)
    rs.start()
    r = redis.Redis(port=rport)
    with open(os.path.join(args.model_dir, "catalog.tsv")) as f:
        catalog = [line.split("\t", 1)[0] for line in f if line.strip()]
    profs = profiles(args, catalog)
    pipe = r.pipeline(transaction=False)
    for u, items in profs.items():
        pipe.set(f"user_profile:{u}", json.dumps(items))
    long_users = [f"soak-long{i}" for i in range(20)]
    for u in long_users:  # 5,000-item profiles: capped at MAX_HISTORY, most recent kept
        pipe.set(f"user_profile:{u}", json.dumps(random.Random(u).choices(catalog, k=5000)))
    huge_users = [f"soak-huge{i}" for i in range(3)]
    for u in huge_users:  # over MAX_PROFILE_BYTES (256 KiB by default): refused, not transferred
        pipe.set(f"user_profile:{u}", json.dumps(random.Random(u).choices(catalog, k=120_000)))
    malformed = {"soak-bad-json": b"[\"0553092626\",", "soak-bad-numbers": b"[1, 2, 3]",
                 "soak-bad-nested": b"[[\"0553092626\"]]", "soak-bad-bytes": b"\xff\xfe[\"a\"]"}
    for u, raw in malformed.items():
        pipe.set(f"user_profile:{u}", raw)
    pipe.execute()
    r.rpush("user_profile:soak-bad-type", "0553092626")
    malformed_users = list(malformed) + ["soak-bad-type"]
    print(f"soak: redis :{rport} ({len(profs)} profiles, {len(long_users)} long, {len(malformed_users)} malformed), "
          f"service :{port}, admin :{aport}, {args.seconds}s, {args.clients} clients", flush=True)

    env = {**os.environ, "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(rport), "PORT": str(port),
           "HOST": "127.0.0.1", "ADMIN_PORT": str(aport), "API_TOKEN": TOKEN, "MODEL_DIR": args.model_dir,
           "DEVICE": "cpu", "LOG_FORMAT": "json", "RUST_LOG": "model_service=warn",
           "MAX_CONNECTIONS": str(args.max_connections), "HEADER_READ_TIMEOUT_SECS": "5"}
    refused = empty_token_refused(args.bin, env)
    print(f"soak: empty API_TOKEN start: {refused}", flush=True)
    log = open(os.path.join(work, "service.log"), "w")
    svc = subprocess.Popen([args.bin, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                break
        except OSError:
            pass
        if svc.poll() is not None:
            raise SystemExit("model-service exited at start; see " + log.name)
        time.sleep(0.2)

    load = Load(port, list(profs), malformed_users, long_users, huge_users)
    attack = Attack(port, args.attack_sockets)
    attack_threads = [threading.Thread(target=attack.hold, daemon=True),
                      threading.Thread(target=attack.probe, daemon=True)]
    attacking = attacked = False
    threads = [threading.Thread(target=load.client, args=(i,), daemon=True) for i in range(args.clients)]
    start = time.time()
    for t in threads:
        t.start()
    rss: list[tuple[float, int]] = []
    events: list[dict] = []
    restarted = reloaded = False
    while (elapsed := time.time() - start) < args.seconds:
        if not rss or elapsed - rss[-1][0] >= 5:
            rss.append((round(elapsed, 1), rss_kib(svc.pid)))
        if not attacking and elapsed >= args.seconds * 0.3:
            attacking = True
            for t in attack_threads:
                t.start()
            events.append({"at_s": round(elapsed, 1), "event": f"attack: {args.attack_sockets} idle/slow sockets"})
        if attacking and not attacked and elapsed >= args.seconds * 0.45:
            attacked = True
            attack.stop.set()
            for t in attack_threads:
                t.join(timeout=30)
            events.append({"at_s": round(elapsed, 1), "event": "attack over"})
        if not restarted and elapsed >= args.seconds * 0.5:
            restarted = True
            load.redis_down.set()
            rs.kill()
            events.append({"at_s": round(elapsed, 1), "event": "redis killed (SIGKILL)"})
            time.sleep(args.redis_down)
            rs.start()
            load.back_until = time.time() + 2.0  # answers already in flight when Redis came back
            load.redis_down.clear()
            events.append({"at_s": round(time.time() - start, 1), "event": "redis restarted"})
        if not reloaded and elapsed >= args.seconds * 0.7:
            reloaded = True
            c = http.client.HTTPConnection("127.0.0.1", aport, timeout=120)
            c.request("POST", "/admin/reload", body=b"", headers={"Authorization": f"Bearer {TOKEN}"})
            resp = c.getresponse()
            events.append({"at_s": round(elapsed, 1), "event": f"reload -> {resp.status}",
                           "body": json.loads(resp.read())})
        time.sleep(0.2)
    load.stop.set()
    for t in threads:
        t.join(timeout=60)
    rss.append((round(time.time() - start, 1), rss_kib(svc.pid)))
    alive = svc.poll() is None

    # Lost writes: every user with a 200 has exactly that list in Redis; error-only users have none.
    lost, differing = [], []
    for user, lists in load.answers.items():
        if len(lists) > 1:
            differing.append(user)
        stored = r.get(f"recommendations:{user}")
        if stored is None or tuple(json.loads(stored)) not in lists:
            lost.append(user)
    half_written = [u for u in malformed_users + huge_users if r.exists(f"recommendations:{u}")]
    for failure in attack.probe_failures:
        load.unexpected.append({"kind": "health_live_probe", "error": failure})
    attack_ok = all(v["refused"] for v in refused.values()) and attack.closed_by_server > 0

    baseline = next((kib for t, kib in rss if t >= args.warmup), rss[0][1])
    end_rss = rss[-1][1]
    growth = (end_rss - baseline) / baseline if baseline else 0.0
    counts = collections.Counter()
    by_kind = collections.Counter()
    for (kind, status, code), n in load.counts.items():
        counts[f"{status} {code or ''}".strip()] += n
        by_kind[kind] += n
    total = sum(counts.values())
    ok = (alive and not lost and not differing and not half_written and not load.unexpected and abs(growth) <= 0.10
          and attack_ok)
    report = {
        "seconds": args.seconds, "clients": args.clients, "requests": total,
        "requests_per_second": round(total / args.seconds, 1),
        "answers_by_status": dict(sorted(counts.items())), "requests_by_kind": dict(sorted(by_kind.items())),
        "unexpected": len(load.unexpected), "unexpected_examples": load.unexpected[:10],
        "users_with_200": len(load.answers), "lost_writes": len(lost), "lost_examples": lost[:10],
        "users_with_differing_answers": len(differing), "half_written": half_written,
        "rss_kib": {"after_warmup": baseline, "end": end_rss, "growth": round(growth, 4),
                    "warmup_s": args.warmup, "samples": rss},
        "attack": {"empty_token_start": refused, "sockets_opened": attack.opened,
                   "sockets_closed_by_server": attack.closed_by_server, "health_live_probes": attack.probes,
                   "health_live_failures": len(attack.probe_failures), "max_connections": args.max_connections},
        "events": events, "service_alive_at_end": alive, "verdict": "pass" if ok else "fail",
        "command": "python -m model_service_py.soak " + " ".join(sys.argv[1:]),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        from . import data as ds
        f.write(ds.portable(json.dumps(report, indent=1), data_dir=args.data))
    print(json.dumps({k: v for k, v in report.items() if k != "rss_kib"} | {
        "rss_kib": {k: v for k, v in report["rss_kib"].items() if k != "samples"}}, indent=1))
    svc.send_signal(signal.SIGTERM)
    try:
        code = svc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        svc.kill()
        code = "killed"
    print(f"soak: service exit status after SIGTERM: {code}; verdict: {report['verdict']} (log {log.name})")
    rs.kill()
    sys.exit(0 if ok and code == 0 else 1)


if __name__ == "__main__":
    main()
