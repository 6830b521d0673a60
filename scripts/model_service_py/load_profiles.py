#!/usr/bin/env python3
"""Write the Amazon-Book training histories to Redis as user_profile:<reviewer_id> = JSON array of
ASINs (what the frontend writes), for backfill runs and benchmarks.

usage: python -m model_service_py.load_profiles --data DIR [--host localhost] [--port 6379] [--db 0] [--users N]
"""

import argparse
import json
import time

import redis

from . import data as ds


def write_profiles(r: redis.Redis, d: ds.Dataset, users) -> None:
    """SET user_profile:<reviewer_id> for each user index, pipelined in chunks."""
    pipe = r.pipeline(transaction=False)
    for n, u in enumerate(users):
        pipe.set(f"user_profile:{d.users[u]}", json.dumps([d.asins[i] for i in d.train[u]]))
        if n % 5000 == 4999:
            pipe.execute()
    pipe.execute()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=6379)
    p.add_argument("--db", type=int, default=0)
    p.add_argument("--users", type=int, default=0, help="only the first N users (0: all)")
    args = p.parse_args()
    d = ds.load(args.data)
    r = redis.Redis(host=args.host, port=args.port, db=args.db)
    t = time.time()
    users = range(d.num_users if not args.users else min(args.users, d.num_users))
    write_profiles(r, d, users)
    print(f"wrote {len(users)} profiles in {time.time() - t:.1f}s")


if __name__ == "__main__":
    main()
