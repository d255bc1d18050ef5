"""Decision agreement: IoU, V-measure and CKA against hand computations, trace semantics, the trace job
end to end on the embedded model (2 methods x 16 images) and the report's section."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import methods
import run_all
from bench import jobs, models
from bench.jobs import trace as trace_job
from bench.report import agreement
from bench.report.agreement import Trace, compare, kept_iou, linear_cka, v_measure
from bench.spec import JobSpec

K, I, D, F = methods.KEPT, methods.IDLE, methods.DROPPED, methods.FUSED

# ----------------------------------------------------------------------------------------------
# Measures by hand


def test_kept_iou_by_hand():
    a = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    b = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]], bool)
    np.testing.assert_allclose(kept_iou(a, b), [1 / 3, 1.0, 2 / 4])  # both empty: the same decision


def _v_by_hand(a, b) -> float:
    """V-measure written out from the contingency table, for the tests only."""
    n = len(a)
    table = {}
    for x, y in zip(a, b):
        table[x, y] = table.get((x, y), 0) + 1

    def entropy(counts):
        return -sum(c / n * math.log(c / n) for c in counts)

    h_a = entropy([sum(c for (x, _), c in table.items() if x == k) for k in set(a)])
    h_b = entropy([sum(c for (_, y), c in table.items() if y == k) for k in set(b)])
    h_ab = entropy(table.values())
    hom = 1.0 if h_a == 0 else 1 - (h_ab - h_b) / h_a
    com = 1.0 if h_b == 0 else 1 - (h_ab - h_a) / h_b
    return 0.0 if hom + com == 0 else 2 * hom * com / (hom + com)


def test_v_measure_of_hand_examples():
    # [0,0,1,1] vs [0,0,1,2]: homogeneity 1 (each B cluster is pure), completeness 1 - 0.5 bit / 1.5 bits = 2/3,
    # V = 2 * 1 * (2/3) / (5/3) = 0.8
    assert v_measure([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(0.8)
    assert v_measure([0, 0, 1, 1], [5, 5, 9, 9]) == pytest.approx(1.0)  # label names do not matter
    assert v_measure([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0)  # independent partitions
    assert v_measure([3, 3, 3], [3, 3, 3]) == pytest.approx(1.0)  # one cluster each: H = 0 on both sides
    # dropped patches carry unique negative labels (-1 - p) and are singletons
    a, b = [0, 0, 1, -4, -5, 2], [7, 7, 7, 1, 2, 3]
    assert v_measure(a, b) == pytest.approx(_v_by_hand(a, b))
    assert v_measure([0, 1, 0, 1], [0, 0, 1, 2]) == pytest.approx(v_measure([0, 0, 1, 2], [0, 1, 0, 1]))  # symmetric


def test_v_measure_rows_match_one_by_one():
    rng = np.random.default_rng(0)
    a, b = rng.integers(-3, 6, (5, 12)), rng.integers(0, 4, (5, 12))
    np.testing.assert_allclose(v_measure(a, b), [_v_by_hand(list(x), list(y)) for x, y in zip(a, b)])


def test_linear_cka_by_hand():
    # 1-D features: CKA = squared correlation; centred x = (-1, 0, 1), y = (0, -1, 1): 1 / (2 * 2)
    assert linear_cka([[1.0], [2.0], [3.0]], [[1.0], [0.0], [2.0]]) == pytest.approx(0.25)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4))
    rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    assert linear_cka(x, 3.0 * x @ rotation + 5.0) == pytest.approx(1.0)  # rotation, scale and shift
    assert math.isnan(linear_cka(x, np.ones((30, 2))))
    with pytest.raises(agreement.AgreementError):
        linear_cka(x, x[:10])


# ----------------------------------------------------------------------------------------------
# Traces


def _trace(states=None, groups=None, n=2, depth=4, patches=4, features=None, pred=None) -> Trace:
    labels = np.arange(n)
    feats = features if features is not None else np.arange(n * 2, dtype=float).reshape(n, 2) ** 2
    return Trace(labels, labels if pred is None else np.asarray(pred), feats, depth, patches,
                 {b: np.asarray(v) for b, v in (states or {}).items()}, {b: np.asarray(v) for b, v in (groups or {}).items()})


def test_trace_carries_the_latest_decision_forward():
    t = _trace(states={1: [[K, D, K, D], [K, K, K, F]]})
    assert t.kept_at(0).all()  # before any reduction everything is kept
    assert t.kept_at(3).tolist() == [[True, False, True, False], [True, True, True, False]]
    assert t.group_at(2).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]  # no merge: each patch its own token


def test_compare_by_hand():
    # pruning A at block 1 (image 0 keeps patches {0,1}, image 1 {0,2}); merging B at block 2
    a = _trace(states={1: [[K, K, D, D], [K, D, K, D]]})
    b = _trace(states={2: [[K, F, K, F], [K, K, F, F]]}, groups={2: [[0, 0, 1, 1], [0, 1, 0, 0]]})
    out = compare(a, b)
    # block 1: B keeps all -> IoU 2/4 per image; blocks 2, 3: image 0 {0,1} vs {0,2} = 1/3, image 1 {0,2} vs {0,1} = 1/3
    assert out["kept_iou_per_block"] == pytest.approx([1.0, 0.5, 1 / 3, 1 / 3])
    assert out["kept_iou"] == pytest.approx((0.5 + 1 / 3 + 1 / 3) / 3)  # from block 1, A's first reduction
    assert out["kept_iou_final"] == pytest.approx(1 / 3)
    assert math.isnan(out["merge_vmeasure"])  # A does not merge
    c = _trace(states={3: [[K, F, K, F], [K, K, F, F]]}, groups={3: [[0, 0, 1, 2], [0, 1, 0, 0]]})
    both = compare(b, c)
    # block 2: C is still unmerged (each patch alone) vs B's pairs; block 3: image 0 -> 0.8, image 1 -> 1
    expected2 = np.mean([_v_by_hand([0, 0, 1, 1], [0, 1, 2, 3]), _v_by_hand([0, 1, 0, 0], [0, 1, 2, 3])])
    assert both["merge_vmeasure"] == pytest.approx(np.mean([expected2, np.mean([0.8, 1.0])]))
    assert both["merge_vmeasure_final"] == pytest.approx(0.9)
    assert both["cls_cka"] == pytest.approx(1.0) and both["pred_agreement"] == 1.0
    with pytest.raises(agreement.AgreementError):
        compare(a, _trace(n=2, depth=6))  # another model


# ----------------------------------------------------------------------------------------------
# The trace job end to end: 2 methods x 16 images, then the report section


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("agreement") / "run"
    rc = run_all.main(["--methods", "evit,tome", "--ratios", "0.5", "--metrics", "acc,trace", "--limit", "16",
                       "--batch-size", "8", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    return out


def test_trace_files(run):
    files = {p.name.split("-")[1]: p for p in (run / "records").glob("trace-*.trace.npz")}
    assert set(files) == {"none", "evit", "tome"}
    with np.load(files["evit"]) as npz:
        assert npz["state_blocks"].tolist() == [3, 6, 9] and npz["group_blocks"].tolist() == []
        assert npz["state_3"].dtype == np.int8 and npz["state_3"].shape == (16, 49)
        assert (npz["state_3"] == K).sum(1).tolist() == [25] * 16  # ceil(0.5 * 49) kept, the rest fused
        assert npz["features"].dtype == np.float16 and npz["features"].shape == (16, 64)
        assert int(npz["depth"]) == 12 and int(npz["num_patches"]) == 49
        evit = {name: npz[name] for name in npz.files}
    with np.load(files["tome"]) as npz:
        assert npz["group_blocks"].tolist() == list(range(12)) and npz["group_0"].dtype == np.int16
    with np.load(next((run / "records").glob("acc-evit-*.preds.npz"))) as preds:
        np.testing.assert_array_equal(evit["labels"], preds["labels"])
        np.testing.assert_array_equal(evit["pred"], preds["top5"][:, 0])
    # the features are the model's own pre-logits (head input), to float16 precision
    spec = JobSpec(kind="trace", model=models.EMBEDDED_MODEL, method="evit", keep_ratio=0.5, limit=16)
    model = jobs.accuracy.patched_model(spec, jobs.JobContext(run, {})).eval()
    from bench import data

    dataset = data.eval_dataset(spec.data, model, 16)
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(torch.stack([dataset[i][0] for i in range(16)])),
                                 pre_logits=True)
    np.testing.assert_allclose(evit["features"].astype(np.float32), pre.numpy(), rtol=2e-3, atol=2e-3)


def test_report_has_the_agreement_section(run):
    text = (run / "report.md").read_text()
    assert "## Decision agreement" in text and "### tokenbench_vit_fmnist, off-the-shelf, keep 0.5 (16 images)" in text
    pairs = pd.read_csv(run / "agreement.csv")
    assert {(r.a, r.b) for r in pairs.itertuples()} == {("none", "evit"), ("none", "tome"), ("evit", "tome")}
    assert pairs["n_images"].tolist() == [16] * 3 and pairs["mcnemar_p"].notna().all()
    with np.load(next((run / "records").glob("trace-evit-*.trace.npz"))) as npz:
        share_kept = (npz["state_9"] == K).mean()  # against the baseline, which keeps everything
    assert pairs.loc[pairs["b"] == "evit", "kept_iou_final"].item() == pytest.approx(share_kept)
    assert pairs["merge_vmeasure"].isna().all()  # only ToMe merges
    assert (run / "figures" / "agreement_tokenbench_vit_fmnist_off-the-shelf_keep0p5.png").is_file()
    assert "ΔTop-1" in text[text.index("## Decision agreement"):]


def test_trace_is_asked_for_by_name_and_keyed_canonically(tmp_path):
    assert "trace" in jobs.measuring() and "trace" not in jobs.defaults()
    request, _ = run_all.parse(["--methods", "evit", "--device", "cpu", "--out", str(tmp_path / "a")])
    from bench import grid

    assert {s.kind for s in grid.plan(request).jobs} == {"acc", "flops", "throughput"}
    kind = jobs.get("trace")
    spec = JobSpec(kind="trace", model=models.EMBEDDED_MODEL, extra=(("images", 1000),))
    assert kind.normalise(spec).key == kind.normalise(JobSpec(kind="trace", model=spec.model)).key
    assert trace_job.images_of(kind.normalise(JobSpec(kind="trace", model=spec.model, limit=40))) == 40
    with pytest.raises(trace_job.TraceError):
        kind.normalise(JobSpec(kind="trace", model=spec.model, extra=(("images", 0),)))


def test_new_report_parts_import_no_other_part():
    folder = Path(agreement.__file__).parent
    for part in ("agreement", "calibration", "stats"):
        tree = ast.parse((folder / f"{part}.py").read_text())
        names = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1
                 for a in node.names} | {node.module for node in ast.walk(tree)
                                         if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
        assert not names & {"tables", "plots", "viz", "agreement", "calibration"} - {part}, (part, names)


def _write_trace(path: Path, t: Trace) -> None:
    arrays = dict(labels=t.labels, pred=t.pred, features=t.features.astype(np.float16), depth=t.depth,
                  num_patches=t.num_patches, state_blocks=np.array(sorted(t.states), dtype=np.int64),
                  group_blocks=np.array(sorted(t.groups), dtype=np.int64))
    arrays.update({f"state_{b}": v.astype(np.int8) for b, v in t.states.items()})
    arrays.update({f"group_{b}": v.astype(np.int16) for b, v in t.groups.items()})
    np.savez(path, **arrays)


def test_table_matches_configurations_with_layers_and_options(tmp_path):
    (tmp_path / "records").mkdir()
    rows, summary = [], []
    for name, method, layers, options, states, delta in [
            ("base", "none", (), (), {}, math.nan),
            ("a", "topk", (3, 6, 9), (("score", "logit"),), {1: [[K, K, D, D], [K, D, K, D]]}, -5.0),
            ("b", "evit", (2,), (("fuse", False),), {2: [[K, D, K, D], [K, K, D, D]]}, -7.0)]:
        _write_trace(tmp_path / "records" / f"{name}.trace.npz", _trace(states=states))
        config = dict(model="m", method=method, keep_ratio=1.0 if method == "none" else 0.5, layers=layers,
                      options_key=options, regime="off-the-shelf", checkpoint="", pretrained=False,
                      random_weights=False, data="d", seed=0)
        rows.append(dict(config, run=str(tmp_path), kind="trace", status="ok", trace_file=f"{name}.trace.npz",
                         n_images=2, options=dict(options)))
        summary.append(dict(config, top1=80.0 + (0 if math.isnan(delta) else delta), delta_top1=delta,
                            preds_path=None))
    pairs = agreement.table(pd.DataFrame(rows), pd.DataFrame(summary))
    assert len(pairs) == 3
    ab = pairs[(pairs["method_a"] == "evit") & (pairs["method_b"] == "topk")].iloc[0]  # registry order
    assert ab["delta_top1_a"] == -7.0 and ab["delta_top1_b"] == -5.0  # found despite layers and options
    assert ab["b"] == "topk (score=logit, layers=3,6,9)" and ab["kept_iou_final"] == pytest.approx(1 / 3)
    assert math.isnan(ab["mcnemar_p"])  # no predictions files: no test
    matrix = agreement.matrix(pairs, "kept_iou")
    assert matrix.shape == (3, 3) and (np.diag(matrix) == 1).all()
    assert math.isnan(agreement.matrix(pairs, "merge_vmeasure").iloc[0, 0])  # nobody merges
    section = agreement.markdown(pairs, {}, tmp_path)
    assert section[0] == "## Decision agreement" and any("most similar" in line for line in section)


def test_v_measure_needs_real_merges_on_both_sides():
    merging = _trace(states={1: [[K, F, K, K], [K, K, F, K]]}, groups={1: [[0, 0, 1, 2], [0, 1, 1, 2]]})
    pruning = _trace(states={1: [[K, D, K, K], [K, K, D, K]]}, groups={1: [[0, -2, 1, 2], [0, 1, -3, 2]]})
    assert merging.merges and not pruning.merges  # dropped patches (-1 - p) are no merge
    assert math.isnan(compare(merging, pruning)["merge_vmeasure"])
    assert compare(merging, merging)["merge_vmeasure"] == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["idle-swin", "dynamicvit-swin"])
def test_trace_of_a_swin_model(method):
    """Swin has no `blocks` and its head pools before `fc`: the trace takes the depth from the geometry
    and the pooled (n, D) features from the classifier's input."""
    from torch.utils.data import TensorDataset

    from bench.jobs.trace import trace
    from swin_models import swin

    model = methods.apply(swin(0, torch.float32), method, 0.7)
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    arrays = trace(model, TensorDataset(images, torch.arange(6)), batch_size=4)
    assert arrays["features"].shape == (6, model.num_features)
    assert int(arrays["depth"]) == model.token_reduction.geometry.depth
    assert arrays["state_blocks"].size and all(arrays[f"state_{b}"].shape == (6, 1024) for b in arrays["state_blocks"])
