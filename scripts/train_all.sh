#!/usr/bin/env bash
# Retrain all three stages on Amazon-Book and assemble a serving directory. Resumable: each step
# checkpoints under WORK and a finished export is not redone (delete WORK/export to start over).
#
# usage: scripts/train_all.sh DATA_DIR [OUT_DIR=model_output] [WORK=~/.cache/model-service/train]
# Environment: LIGHTGCN_EPOCHS (24), DIN_EPOCHS (3), RANKNET_EPOCHS (6), HOLDOUT (0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
data="$(cd "${1:?usage: scripts/train_all.sh DATA_DIR [OUT_DIR] [WORK]}" && pwd)"
out="$(mkdir -p "${2:-model_output}" && cd "${2:-model_output}" && pwd)"
work="${3:-$HOME/.cache/model-service/train}"
mkdir -p "$work/export"
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
setup_apt && setup_venv
holdout="${HOLDOUT:-0.1}"
cd scripts
[ -f "$work/export/lightgcn/model.pt" ] || "$PY" -W ignore train_lightgcn.py --data "$data" --work "$work/lightgcn" \
    --holdout "$holdout" --epochs "${LIGHTGCN_EPOCHS:-24}" --lr 3e-3 --eval-every 3 --resume --out "$work/export/lightgcn"
[ -f "$work/export/din/model.pt" ] || "$PY" -W ignore train_din.py --data "$data" --lightgcn "$work/export/lightgcn" \
    --work "$work/din" --holdout "$holdout" --epochs "${DIN_EPOCHS:-3}" --resume --out "$work/export/din"
[ -f "$work/export/ranknet/model.pt" ] || "$PY" -W ignore train_ranknet.py --data "$data" --lightgcn "$work/export/lightgcn" \
    --din "$work/export/din" --work "$work/ranknet" --holdout "$holdout" --epochs "${RANKNET_EPOCHS:-6}" --out "$work/export/ranknet"
"$PY" assemble_models.py --data "$data" --lightgcn "$work/export/lightgcn" --din "$work/export/din" \
    --ranknet "$work/export/ranknet" --out "$out"
