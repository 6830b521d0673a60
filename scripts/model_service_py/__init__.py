"""The Python side of model-service: the three stages' definitions and TorchScript export contract
(msmodels), the Amazon-Book split (data), the reference cascade (cascade), sparse EASE (ease),
training (train_lightgcn, train_din, train_ranknet, assemble_models, reexport), evaluation and
baselines (evaluate, baselines), test models (make_test_models) and load tools (load_profiles, soak).

Each command-line module runs as `python -m model_service_py.<module> --help`. The package is
found through PYTHONPATH=<repo>/scripts, which scripts/setup.sh exports (so every shell entry point
and `scripts/py` have it); no module changes the import path itself.
"""

import os

# The repository root (this file is <repo>/scripts/model_service_py/__init__.py).
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
