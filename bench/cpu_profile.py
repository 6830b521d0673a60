#!/usr/bin/env python3
"""Where the CPU goes, per request: the release server under wrk at one concurrency, sampled by
`perf record -e cpu-clock` over the whole machine (hardware counters are not needed), each sample
put in one bucket by its thread, library and symbol.

Buckets: the load generator (wrk) and redis-server on the same cores; in model-service, the
inference threads' time in MKL / OpenMP / vectorised ATen kernels ("kernels"), the rest of libtorch
(operator dispatch, TorchScript interpreter, tensor allocation: "dispatch"), our own code and libc
on those threads, and the tokio threads (HTTP, Redis client, JSON) and the kernel (network stack,
scheduling); idle time is left out. Printed as shares of the busy samples and as CPU milliseconds
per request.

usage: python bench/cpu_profile.py --data DIR [--bin target/release/model-service] [--concurrency 32] [--seconds 20] [--top 15]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile
import time

# bench.py beside this file: Python puts the script's own folder first on its path
from bench import Service, free_port, load_amazon, run_wrk, server_env, wait_healthy
from model_service_py.evaluate import start_redis

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
IDLE = "idle"
# loop_inner*: the labels of fbgemm's fp16 GEMM micro-kernels (LightGCN's CPU product), which perf
# names in place of the kernel functions
KERNEL_SYMBOLS = re.compile(r"mkl_|gemm|sgemm|omp|gomp|avx|AVX|vec::|Vectorized|cpu_kernel|kernel_impl|"
                            r"loop_2d|VectorizedLoop|index_select|topk|sort|reduce|binary_op|unary_op|loop_inner")


def bucket(comm: str, dso: str, sym: str) -> str:
    if comm.startswith("swapper"):
        return IDLE
    if comm.startswith("wrk"):
        return "wrk (load generator)"
    if comm.startswith("redis-server") or comm.startswith("redis-"):
        return "redis-server"
    if dso.startswith("[kernel"):
        return "kernel (network, scheduling)"
    if comm.startswith("inference"):
        if "libtorch" in dso or "libgomp" in dso or "mkl" in dso or "libc10" in dso:
            return "inference: libtorch kernels" if KERNEL_SYMBOLS.search(sym) or "mkl" in dso or "gomp" in dso \
                else "inference: libtorch dispatch, allocation, TorchScript"
        if "libc" in dso:
            return "inference: libc (malloc, memcpy)"
        return "inference: model-service (batching, candidate selection)"
    if comm.startswith("tokio") or comm.startswith("model-service"):
        return "tokio threads (HTTP, Redis client, JSON)"
    return f"other ({comm})"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="Amazon-Book directory")
    p.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "model-service"))
    p.add_argument("--model-dir", default=os.path.join(ROOT, "model_output"))
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--json", help="write the buckets here")
    p.add_argument("--top", type=int, default=0, help="also print each bucket's N heaviest symbols")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="ms-cpu-")
    rproc, r, rport = start_redis(work)
    svc = None
    try:
        users_file, _ = load_amazon(r, args.data, work)
        port = free_port()
        svc = Service("model-service", [args.bin, "serve"], server_env(rport, port, args.model_dir), port,
                      os.path.join(work, "server.log"))
        wait_healthy(f"http://127.0.0.1:{port}/health", svc.proc)
        run_wrk(port, users_file, 8, 3)  # warm-up
        data = os.path.join(work, "perf.data")
        perf = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "997", "-a", "-o", data, "--", "sleep",
                                 str(args.seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        result = run_wrk(port, users_file, args.concurrency, args.seconds - 1)
        perf.wait()
    finally:
        if svc:
            svc.stop()
        rproc.terminate()
        rproc.wait()
    report = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "comm,dso,sym",
                             "--percent-limit", "0", "-F", "period,comm,dso,sym"],
                            capture_output=True, text=True).stdout
    buckets: dict[str, int] = collections.Counter()
    symbols: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total = 0
    for line in report.splitlines():
        m = re.match(r"\s*(\d+)\s+(\S+)\s+(\S+)\s+\[.\]\s+(.*)", line)
        if not m:
            continue
        period, comm, dso, sym = int(m.group(1)), m.group(2), m.group(3), m.group(4).strip()
        where = bucket(comm, dso, sym)
        buckets[where] += period
        symbols[where][f"{os.path.basename(dso)} {sym}"] += period
        total += period
    requests = max(result["requests"], 1)
    idle = buckets.pop(IDLE, 0)
    total -= idle
    cpu_ms = total / 1e6  # cpu-clock periods are nanoseconds
    rps = result["requests"] / (result["duration_us"] / 1e6)
    print(f"\nconcurrency {args.concurrency}: {rps:.0f} req/s, p50 {result['p50_us'] / 1e3:.1f} ms, "
          f"{cpu_ms / 1e3:.1f} busy CPU s sampled over {args.seconds} s on {os.cpu_count()} cores "
          f"({idle / 1e9:.1f} s idle)\n")
    print("| where | share of busy CPU | CPU ms per request |")
    print("|---|---|---|")
    rows = {}
    for name, period in sorted(buckets.items(), key=lambda kv: -kv[1]):
        if period / total < 0.001:
            continue
        rows[name] = {"share": period / total, "ms_per_request": period / 1e6 / requests}
        print(f"| {name} | {period / total:.1%} | {period / 1e6 / requests:.3f} |")
    print(f"| all | 100% | {total / 1e6 / requests:.3f} |")
    if args.top:
        for name, _ in sorted(buckets.items(), key=lambda kv: -kv[1]):
            print(f"\n{name}, heaviest symbols (CPU ms per request):")
            for sym, period in symbols[name].most_common(args.top):
                print(f"  {period / 1e6 / requests:.4f}  {sym[:150]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"concurrency": args.concurrency, "req_per_s": rps, "p50_ms": result["p50_us"] / 1e3,
                       "idle_cpu_s": idle / 1e9, "buckets": rows}, f, indent=2)


if __name__ == "__main__":
    main()
