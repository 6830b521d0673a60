#!/bin/sh
# Build aoti_run against the torch wheel of $PY (headers and libraries), as build.rs does for the
# server's C++ shim.
set -e
cd "$(dirname "$0")"
TORCH="$(${PY:-python3} -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
g++ -O2 -std=c++17 -D_GLIBCXX_USE_CXX11_ABI=1 \
  -I"$TORCH/include" -I"$TORCH/include/torch/csrc/api/include" \
  aoti_run.cpp -o aoti_run \
  -L"$TORCH/lib" -Wl,-rpath,"$TORCH/lib" -Wl,--no-as-needed -ltorch -ltorch_cpu -lc10 -Wl,--as-needed
