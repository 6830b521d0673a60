#!/usr/bin/env bash
# Retrain the cascade (v2) on Amazon-Book and assemble a serving directory. Resumable: each step
# checkpoints under WORK and a finished step is not redone (delete its output under WORK/export or
# WORK/ease to redo it). Every step logs to WORK/logs/<step>.log and records its wall time in
# WORK/timings/<step> (copied into manifest.json).
#
# usage: scripts/train_all.sh DATA_DIR [OUT_DIR=model_output] [WORK=~/.cache/model-service/train-v2]
# Environment: LIGHTGCN_EPOCHS (24), DIN_EPOCHS (2), RANKNET_EPOCHS (12), HOLDOUT (0.1),
#              C1 (600 LightGCN candidates), C2 (100 DIN candidates), EASE_LAMBDA (200).
set -euo pipefail
cd "$(dirname "$0")/.."
data="$(cd "${1:?usage: scripts/train_all.sh DATA_DIR [OUT_DIR] [WORK]}" && pwd)"
out="$(mkdir -p "${2:-model_output}" && cd "${2:-model_output}" && pwd)"
work="${3:-$HOME/.cache/model-service/train-v2}"
mkdir -p "$work/export" "$work/ease" "$work/logs" "$work/timings"
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
setup_apt && setup_venv
holdout="${HOLDOUT:-0.1}"
c1="${C1:-600}"
c2="${C2:-100}"
lam="${EASE_LAMBDA:-200}"

# step NAME DONE_FILE CMD...: run CMD unless DONE_FILE exists, log and time it
step() {
    local name="$1" done_file="$2"
    shift 2
    if [ -f "$done_file" ]; then
        echo "[train_all] $name: done ($done_file)"
        return
    fi
    echo "[train_all] $name: running, log $work/logs/$name.log"
    local t0=$SECONDS
    "$@" 2>&1 | tee -a "$work/logs/$name.log"
    echo $((SECONDS - t0)) >"$work/timings/$name"
}

step lightgcn "$work/export/lightgcn/model.pt" "$PY" -W ignore -m model_service_py.train_lightgcn --data "$data" --work "$work/lightgcn" \
    --holdout "$holdout" --epochs "${LIGHTGCN_EPOCHS:-24}" --lr 3e-3 --eval-every 3 --resume --out "$work/export/lightgcn"
# sparse EASE: on the kept interactions (training features) and on all of train.txt (serving)
step ease_kept "$work/ease/kept_50.pt" "$PY" -W ignore -m model_service_py.ease --data "$data" --holdout "$holdout" --lam "$lam" \
    --neighbours 50 --out "$work/ease/kept_50.pt"
step ease_full "$work/ease/full_50.pt" "$PY" -W ignore -m model_service_py.ease --data "$data" --holdout 0 --lam "$lam" \
    --neighbours 50 --out "$work/ease/full_50.pt"
step din "$work/export/din/model.pt" "$PY" -W ignore -m model_service_py.train_din --data "$data" --lightgcn "$work/export/lightgcn" \
    --ease-train "$work/ease/kept_50.pt" --ease-serve "$work/ease/full_50.pt" --work "$work/din" --holdout "$holdout" \
    --c1 "$c1" --epochs "${DIN_EPOCHS:-2}" --resume --out "$work/export/din"
step ranknet "$work/export/ranknet/model.pt" "$PY" -W ignore -m model_service_py.train_ranknet --data "$data" --lightgcn "$work/export/lightgcn" \
    --din "$work/export/din" --ease-train "$work/ease/kept_50.pt" --work "$work/ranknet" \
    --holdout "$holdout" --c1 "$c1" --c2 "$c2" --epochs "${RANKNET_EPOCHS:-12}" --out "$work/export/ranknet"
"$PY" -m model_service_py.assemble_models --data "$data" --lightgcn "$work/export/lightgcn" --din "$work/export/din" \
    --ranknet "$work/export/ranknet" --c1 "$c1" --c2 "$c2" --timings "$work/timings" --out "$out"
