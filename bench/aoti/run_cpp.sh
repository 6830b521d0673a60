#!/bin/sh
# From C++: AOTIModelPackageLoader against torch::jit::load, one thread, the real inputs that
# dump_inputs.py wrote.
set -e
cd "$(dirname "$0")"
M="${MODEL_DIR:-../../model_output}"
for h in 10 50; do for b in 1 8 16; do
  ./aoti_run din pkgs/din2.pt2 "$M/din/model.pt" 1 1 1 15 10 "inputs/din_b${b}_h${h}.pt" | tail -2 | sed "s/^/[h~$h] /"
  ./aoti_run ranknet pkgs/ranknet.pt2 "$M/ranknet/model.pt" 1 1 1 15 10 "inputs/ranknet_b${b}_h${h}.pt" | tail -2 | sed "s/^/[h~$h] /"
done; done
