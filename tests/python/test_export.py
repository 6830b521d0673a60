"""The TorchScript export contract of the three stages (model_service_py.msmodels), on small
synthetic models: shapes, that padding behind the mask changes nothing, and eager/TorchScript parity.

The package is importable through pytest.ini's `pythonpath` (scripts/)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import model_service_py
from model_service_py import msmodels

N, D = 50, 8


def lightgcn(fp16_table=True):
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(N, D), dim=1)
    return msmodels.LightGCNServe(torch.randn(N, D), emb, torch.rand(N) + 0.1, fp16_table=fp16_table)


def din():
    torch.manual_seed(1)
    return msmodels.DIN(N, dim=D, att_hidden=8, mlp_hidden=16).eval()


def din2(max_att=3):
    torch.manual_seed(5)
    idx = torch.randint(0, N, (N, 4))
    return msmodels.DIN2(N, idx, torch.rand(N, 4), torch.rand(N), dim=D, hidden=8, max_att=max_att).eval()


def ranknet():
    torch.manual_seed(2)
    return msmodels.RankNet(F.normalize(torch.randn(N, D), dim=1), torch.rand(N), torch.zeros(7), torch.ones(7), hidden=8).eval()


def ranknet_with_table():
    """The older form: feature 7 is a neighbour-table score."""
    torch.manual_seed(2)
    idx = torch.randint(0, N, (N, 4))
    return msmodels.RankNet(
        F.normalize(torch.randn(N, D), dim=1), torch.rand(N), torch.zeros(8), torch.ones(8), hidden=8,
        neighbours=(idx, torch.rand(N, 4)),
    ).eval()


def batch(pad_value=0):
    history = torch.tensor([[3, 7, 9, pad_value, pad_value], [1, 2, 3, 4, 5], [pad_value] * 5])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    cands = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23], [0, 1, 2, 3]])
    s1 = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    s2 = torch.randn(3, 4, generator=torch.Generator().manual_seed(4))
    return history, mask, cands, s1, s2


def call(kind, module, b):
    h, m, c, s1, s2 = b
    return {"lightgcn": lambda: module(h, m), "din": lambda: module(h, m, c), "din2": lambda: module(h, m, c, s1),
            "ranknet": lambda: module(h, m, c, s1, s2), "ranknet_table": lambda: module(h, m, c, s1, s2)}[kind]()


@pytest.mark.parametrize(
    "kind,make,shape",
    [("lightgcn", lightgcn, (3, N)), ("din", din, (3, 4)), ("din2", din2, (3, 4)), ("ranknet", ranknet, (3, 4)),
     ("ranknet_table", ranknet_with_table, (3, 4))],
)
def test_shapes_and_padding_is_ignored(kind, make, shape):
    module = make()
    with torch.no_grad():
        out0 = call(kind, module, batch(pad_value=0))
        out9 = call(kind, module, batch(pad_value=42))
    assert tuple(out0.shape) == shape
    assert torch.isfinite(out0).all()
    torch.testing.assert_close(out0, out9, msg=f"{kind}: values behind the mask changed the output")


@pytest.mark.parametrize(
    "kind,make",
    [("lightgcn", lightgcn), ("din", din), ("din2", din2), ("ranknet", ranknet), ("ranknet_table", ranknet_with_table)],
)
def test_export_round_trip_matches_eager(tmp_path, kind, make):
    module = make()
    stage = {"din2": "din", "ranknet_table": "ranknet"}.get(kind, kind)
    meta = msmodels.export(module, stage, str(tmp_path / kind), N, {"dim": D})
    loaded = torch.jit.load(str(tmp_path / kind / "model.pt"))
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(call(kind, loaded, b), call(kind, module, b))
    on_disk = json.loads((tmp_path / kind / "meta.json").read_text())
    assert on_disk["stage"] == stage and on_disk["num_items"] == N and on_disk["sha256"] == meta["sha256"]
    assert on_disk["parity_max_abs_diff"] < 1e-4


def test_export_refuses_a_module_whose_script_differs(tmp_path):
    class Drifting(torch.nn.Module):
        def forward(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(history.shape[0], 50)
            if torch.jit.is_scripting():
                return out
            return out + 1.0

    with pytest.raises(RuntimeError, match="differs from eager"):
        msmodels.export(Drifting(), "lightgcn", str(tmp_path / "x"), N, {})
    assert not (tmp_path / "x" / "model.pt").exists(), "a failed check must not leave a model file"


def test_lightgcn_fold_in_user_is_the_normalised_propagation():
    m = lightgcn()
    h = torch.tensor([[3, 7]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    want = (m.item_norm[3] * m.fold_in[3] + m.item_norm[7] * m.fold_in[7]) / (2**0.5)
    torch.testing.assert_close(m.user_vectors(h, mask)[0], want)


def make_test_models(out, *args):
    """Runs the test-model generator as the Rust tests do (testkit/src/models.rs): `python -m`, with
    the package's parent directory on PYTHONPATH."""
    scripts = os.path.dirname(os.path.dirname(os.path.abspath(model_service_py.__file__)))
    path = os.pathsep.join(p for p in (scripts, os.environ.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "model_service_py.make_test_models", str(out), *args]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": path})


def test_generated_test_models_form_a_complete_model_dir(tmp_path):
    out = tmp_path / "models"
    make_test_models(out, "--items", "40")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["catalog"]["num_items"] == 40
    assert len((out / "catalog.tsv").read_text().splitlines()) == 40
    for stage in ("lightgcn", "din", "ranknet"):
        assert (out / stage / "model.pt").is_file()
        assert manifest["models"][stage]["version"].startswith("synthetic-test-" + stage)
        assert manifest["models"][stage]["inputs"] == msmodels.STAGE_INPUTS[stage]


def test_the_python_cascade_excludes_the_history_at_every_stage(tmp_path):
    import numpy as np

    from model_service_py import cascade

    out = tmp_path / "models"
    make_test_models(out)
    model = cascade.Cascade(str(out), c1=40, c2=20)
    histories = [np.array([0, 6, 12, 18]), np.array([5]), np.arange(0, 150, 3)]
    lists = model.rank(histories, k=10)
    for stage in lists:
        assert stage.shape == (3, 10)
        for h, row in zip(histories, stage):
            assert not set(row.tolist()) & set(h.tolist()), "a history item was recommended"
            assert len(set(row.tolist())) == 10
    assert cascade.din_takes_s1(model.din), "the test models use interface v2"
    # the final order is RankNet's: a different order than DIN's for some history
    assert any((a != b).any() for a, b in zip(lists[1], lists[2]))


# max_att 3: the batch's longest profile (5 items) is cut to its last 3; 50: every item is attended
@pytest.mark.parametrize("max_att", [3, 50])
def test_din2_fast_forward_is_the_trained_form(max_att):
    module = din2(max_att)
    with torch.no_grad():
        module.mlp[0].bias.normal_()
        module.feat_mean.normal_()
        module.feat_std.uniform_(0.5, 2.0)
        for pad in (0, 42):
            h, m, c, s1, _ = batch(pad_value=pad)
            torch.testing.assert_close(module(h, m, c, s1), module.reference(h, m, c, s1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [ranknet, ranknet_with_table])
def test_ranknet_fast_forward_is_the_trained_form(make):
    module = make()
    with torch.no_grad():
        module.net[0].bias.normal_()
        module.feat_mean.normal_()
        module.feat_std.uniform_(0.5, 2.0)
        for pad in (0, 42):
            h, m, c, s1, s2 = batch(pad_value=pad)
            want = module.net(module.features(h, m, c, s1, s2)).squeeze(-1)
            torch.testing.assert_close(module(h, m, c, s1, s2), want, rtol=1e-5, atol=1e-5)


def test_ease_scores_sum_the_neighbour_weights_of_the_real_history_items():
    torch.manual_seed(6)
    idx = torch.randint(0, N, (N, 4), dtype=torch.int32)
    val = torch.rand(N, 4)
    h, m, c, _, _ = batch(pad_value=42)
    got = msmodels.ease_scores(h, m, c, idx, val)
    want = torch.zeros(c.shape)
    for i in range(h.shape[0]):
        for item in h[i][m[i]].tolist():
            for k in range(4):
                want[i] += (c[i] == int(idx[item, k])).float() * float(val[item, k])
    torch.testing.assert_close(got, want)
    assert (got[2] == 0).all(), "a row without history scores 0"
    twice = torch.cat([c[:, :2], c[:, :2]], dim=1)  # a candidate listed twice gets its score twice
    torch.testing.assert_close(msmodels.ease_scores(h, m, twice, idx, val), torch.cat([want[:, :2], want[:, :2]], dim=1))


@pytest.mark.parametrize("make", [ranknet, ranknet_with_table])
def test_ranknet_cosine_features_use_the_real_history_items_only(make):
    module = make()
    h, m, c, s1, s2 = batch(pad_value=42)
    feats = module.features(h, m, c, s1, s2)  # standardised with mean 0 and std 1: the raw features
    for i in range(h.shape[0]):
        real = h[i][m[i]]
        if len(real) == 0:
            assert (feats[i, :, 5] == 0).all() and (feats[i, :, 6] == 0).all()
            continue
        sim = module.item_unit[c[i]] @ module.item_unit[real].t()
        torch.testing.assert_close(feats[i, :, 5], sim.amax(dim=1))
        torch.testing.assert_close(feats[i, :, 6], sim.mean(dim=1))
    if module.use_nbr:
        torch.testing.assert_close(feats[:, :, 7], msmodels.ease_scores(h, m, c, module.nbr_idx, module.nbr_val))
    else:
        assert feats.shape[2] == 7


def test_lightgcn_item_vectors_read_either_layout():
    m = lightgcn(fp16_table=False)
    table = msmodels.item_vectors(m)
    assert tuple(table.shape) == (N, D)
    assert msmodels.item_vectors({"item_emb": table}) is table
    h, mask = torch.tensor([[3, 7]]), torch.ones(1, 2, dtype=torch.bool)
    torch.testing.assert_close(m(h, mask), m.user_vectors(h, mask) @ table.t())


def test_lightgcn_fp16_table_scores_within_its_rounding_and_the_packed_copy_is_not_exported(tmp_path):
    exact, fast = lightgcn(fp16_table=False), lightgcn()
    history, mask = batch()[:2]
    want = exact(history, mask)
    got = fast(history, mask)
    assert not torch.equal(got, want), "the CPU forward did not use the fp16 table"
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()
    msmodels.export(fast, "lightgcn", str(tmp_path), N, {})
    loaded = torch.jit.load(str(tmp_path / "model.pt"))
    # the eager call above packed the module's table; the file holds none of it
    assert loaded.packed is None
    torch.testing.assert_close(loaded(history, mask), got, rtol=0, atol=0)
    assert loaded.packed is not None


@pytest.mark.parametrize("kind,make", [("din2", din2), ("ranknet", ranknet)])
def test_the_folded_first_layer_is_made_by_the_first_call_and_not_exported(tmp_path, kind, make):
    module = make()
    b = batch()
    assert module.folded is None
    with torch.inference_mode():
        want = call(kind, module, b)
    assert module.folded is not None
    msmodels.export(module, "din" if kind == "din2" else kind, str(tmp_path), N, {})
    loaded = torch.jit.load(str(tmp_path / "model.pt"))
    assert loaded.folded is None
    with torch.inference_mode():
        torch.testing.assert_close(call(kind, loaded, b), want, rtol=1e-5, atol=1e-6)
    assert loaded.folded is not None
