"""The Python peer for the benchmark: a FastAPI service of the shape model-service replaces.

Per request it reads `user_profile:<id>` with redis-py, maps the ASINs to catalog rows, runs the
three TorchScript stages of MODEL_DIR for that one user under `torch.inference_mode()` (LightGCN
over the catalog with the history excluded, top 200 -> DIN, top 100 -> RankNet, top k), writes
`recommendations:<id>` with its TTL and returns the list: the same files, candidate counts,
history rule (distinct items, latest position, the most recent MAX_HISTORY) and Redis keys as
model-service. Run it with one uvicorn worker per core:

    MODEL_DIR=model_output REDIS_PORT=6379 uvicorn app:app --app-dir bench/peer --workers 2

Each worker computes one request at a time (the event loop runs the models inline: with one worker
per core a thread pool would only add contention), with one libtorch thread (PEER_TORCH_THREADS).
PEER_STAGE_RUNTIME=compiled runs DIN and RankNet from their AOTInductor packages instead (printed
for reference by the benchmark; the peer stands for a service that loads the TorchScript files).
"""

from __future__ import annotations

import json
import os
import time

import redis.asyncio as aioredis
import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse

MODEL_DIR = os.environ.get("MODEL_DIR", "model_output")
MAX_HISTORY = int(os.environ.get("MAX_HISTORY", "200"))
LIGHTGCN_CANDIDATES = int(os.environ.get("LIGHTGCN_CANDIDATES", "1000"))
DIN_CANDIDATES = int(os.environ.get("DIN_CANDIDATES", "100"))
MAX_K = int(os.environ.get("MAX_K", "100"))
TTL = int(os.environ.get("RECOMMENDATION_TTL", "3600"))

torch.set_num_threads(int(os.environ.get("PEER_TORCH_THREADS", "1")))

with open(os.path.join(MODEL_DIR, "manifest.json")) as f:
    VERSION = json.load(f)["version"]
ITEM_IDS: list[str] = []
POPULARITY: list[int] = []
with open(os.path.join(MODEL_DIR, "catalog.tsv")) as f:
    for line in f:
        item, pop = line.rstrip("\n").split("\t")
        ITEM_IDS.append(item)
        POPULARITY.append(int(pop))
ROWS = {item: row for row, item in enumerate(ITEM_IDS)}
BY_POPULARITY = sorted(range(len(ITEM_IDS)), key=lambda r: (-POPULARITY[r], r))

LIGHTGCN = torch.jit.load(os.path.join(MODEL_DIR, "lightgcn", "model.pt")).eval()
DIN = torch.jit.load(os.path.join(MODEL_DIR, "din", "model.pt")).eval()
DIN_TAKES_S1 = len(DIN.forward.schema.arguments) == 5  # interface v2: (history, mask, cands, s1)
RANKNET = torch.jit.load(os.path.join(MODEL_DIR, "ranknet", "model.pt")).eval()
if os.environ.get("PEER_STAGE_RUNTIME", "torchscript") == "compiled":
    # for reference only: DIN and RankNet from the AOTInductor packages beside model.pt
    # (model_service_py.compile_stages), called the same way
    import torch._inductor

    DIN = torch._inductor.aoti_load_package(os.path.join(MODEL_DIR, "din", "model.pt2"))
    _RANKNET_PACKAGE = torch._inductor.aoti_load_package(os.path.join(MODEL_DIR, "ranknet", "model.pt2"))

    def RANKNET(history, mask, cands, s1, s2):  # noqa: N802 (stands in for the module)
        # the package takes the history packed with each item's row (one row here)
        return _RANKNET_PACKAGE(history.reshape(-1), torch.zeros(history.numel(), dtype=torch.long), cands, s1, s2)

redis = aioredis.Redis(
    host=os.environ.get("REDIS_HOST", "127.0.0.1"), port=int(os.environ.get("REDIS_PORT", "6379"))
)
app = FastAPI()


def error(status: int, kind: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": detail}, status_code=status)


def history_rows(items: list) -> list[int]:
    """Known items, each once at its latest position, oldest first, the last MAX_HISTORY."""
    rows = [ROWS[i] for i in items if i in ROWS]
    seen: set[int] = set()
    latest = []
    for row in reversed(rows):
        if row not in seen:
            seen.add(row)
            latest.append(row)
    latest.reverse()
    return latest[-MAX_HISTORY:]


@torch.inference_mode()
def rank(rows: list[int], k: int) -> tuple[list[int], list[float]]:
    history = torch.tensor([rows], dtype=torch.long)
    mask = torch.ones_like(history, dtype=torch.bool)
    scores = LIGHTGCN(history, mask)
    scores[0, history[0]] = float("-inf")
    c1 = min(LIGHTGCN_CANDIDATES, len(ITEM_IDS) - len(rows))
    s1, cand1 = scores.topk(c1, dim=1)
    s2 = DIN(history, mask, cand1, s1) if DIN_TAKES_S1 else DIN(history, mask, cand1)
    s2_top, pos2 = s2.topk(min(DIN_CANDIDATES, c1), dim=1)
    cand2 = cand1.gather(1, pos2)
    s3 = RANKNET(history, mask, cand2, s1.gather(1, pos2), s2_top)
    s3_top, pos3 = s3.topk(min(k, cand2.shape[1]), dim=1)
    return cand2.gather(1, pos3)[0].tolist(), s3_top[0].tolist()


@app.get("/health")
async def health():
    await redis.ping()
    return {"status": "healthy", "model_version": VERSION}


@app.post("/recommend/{user_id}")
async def recommend(user_id: str, k: int = 10):
    started = time.perf_counter()
    if not 1 <= k <= MAX_K:
        return error(400, "invalid_k", f"k must be between 1 and {MAX_K}, got {k}")
    raw = await redis.get(f"user_profile:{user_id}")
    items = json.loads(raw) if raw is not None else []
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        return error(422, "invalid_profile", f"user_profile:{user_id} is not a JSON array of item ids")
    rows = history_rows(items)
    if rows:
        best, scores = rank(rows, k)
        strategy = "personalized"
    else:
        best = BY_POPULARITY[:k]
        scores = [float(POPULARITY[r]) for r in best]
        strategy = "popular"
    ids = [ITEM_IDS[r] for r in best]
    await redis.set(f"recommendations:{user_id}", json.dumps(ids), ex=TTL)
    return {
        "user_id": user_id,
        "recommendations": [{"item_id": i, "score": s} for i, s in zip(ids, scores)],
        "strategy": strategy,
        "model_version": VERSION,
        "elapsed_ms": (time.perf_counter() - started) * 1e3,
    }
