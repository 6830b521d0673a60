#!/usr/bin/env python3
"""What the compiled stages change end to end: one binary and model directory, side by side in
one run, serving the Amazon-Book profiles with STAGE_RUNTIME=torchscript and
STAGE_RUNTIME=compiled (the packages of model_service_py.compile_stages), in alternating rounds
(the machine's speed drifts; compare the means of the same run): requests per second, p50 and p99,
and the server process's own CPU per request.

usage: scripts/py bench/runtime_ab.py --data DIR [--rounds 4] [--concurrency 1,8,32] [--seconds 10]
           [--env MAX_BATCH=16,...]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

# bench.py beside this file: Python puts the script's own folder first on its path
from bench import bad_answers, free_port, load_amazon, measure_round, server_env
from model_service_py.evaluate import start_redis

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="Amazon-Book directory")
    p.add_argument("--binary", default=os.path.join(ROOT, "target/release/model-service"))
    p.add_argument("--model-dir", default=os.path.join(ROOT, "model_output"))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--seconds", type=int, default=10, help="per concurrency level and round")
    p.add_argument("--env", default="", help="extra server environment, ENV=VALUE,ENV=VALUE")
    args = p.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    extra = dict(e.split("=", 1) for e in args.env.split(",") if e)
    work = tempfile.mkdtemp(prefix="ms-runtime-")
    rproc, r, rport = start_redis(work)
    variants = ["torchscript", "compiled"]
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    try:
        users_file, _ = load_amazon(r, args.data, work)
        for rnd in range(args.rounds):
            for name in variants[rnd % 2:] + variants[: rnd % 2]:
                port = free_port()
                env = {**server_env(rport, port, args.model_dir), "STAGE_RUNTIME": name, **extra}
                rows[name] += measure_round(name, rnd, args.binary, env, work, users_file, concurrencies, args.seconds)
    finally:
        rproc.terminate()
        rproc.wait()
    print(f"\nmeans over {args.rounds} alternating rounds ({extra or 'default settings'})")
    for c in concurrencies:
        at = {name: [row for row in rs if row["concurrency"] == c] for name, rs in rows.items()}
        keys = ("rps", "p50_ms", "p99_ms", "cpu_ms_per_request")
        mean = {name: {**{key: np.mean([row[key] for row in a]) for key in keys},
                       **{key: np.mean([row["server"][key] for row in a if row.get("server")] or [0.0])
                          for key in ("inference_cpu_ms_per_rec", "mean_batch")}}
                for name, a in at.items()}
        base = mean["torchscript"]
        for name, m in mean.items():
            print(f"  c={c:<4d} {name:12s} {m['rps']:8.1f} req/s (x{m['rps'] / base['rps']:.3f})  "
                  f"p50 {m['p50_ms']:6.2f} ms (x{m['p50_ms'] / base['p50_ms']:.3f})  "
                  f"p99 {m['p99_ms']:7.2f} ms  server CPU {m['cpu_ms_per_request']:5.3f} ms/req "
                  f"(x{m['cpu_ms_per_request'] / base['cpu_ms_per_request']:.3f}), inference "
                  f"{m['inference_cpu_ms_per_rec']:5.3f} ms/rec at {m['mean_batch']:.1f} a batch  "
                  f"not 200: {sum(bad_answers(row) for row in at[name])}")


if __name__ == "__main__":
    main()
