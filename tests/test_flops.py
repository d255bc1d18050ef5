"""The analytic MAC model against fvcore traces, published figures and the SDPA handle."""
import copy
import warnings
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from torch import nn

import methods
from bench.report.published import half_unit
from methods import Geometry, flops

PUBLISHED = Path(__file__).resolve().parents[1] / "bench" / "assets" / "published.csv"
DEIT_SHAPE = (3, 224, 224)


def deit_geometry(dim: int, heads: int) -> Geometry:
    """A DeiT at 224 px written out from docs/methods.md#block-cost and docs/methods.md#stem-and-head: 4 D^2 + 8 D^2 per token and block, a 16x16x3
    patch per token in the stem, one 1000-class head."""
    return Geometry(num_patches=196, num_prefix=1, has_cls=True, depth=12, dim=dim, num_heads=heads,
                    attn_dim=dim, attn_linear_macs=4 * dim * dim, mlp_macs=8 * dim * dim,
                    stem_macs=196 * 768 * dim, head_macs=1000 * dim)


GEOMETRIES = {
    "deit_tiny_patch16_224": deit_geometry(192, 3),
    "deit_small_patch16_224": deit_geometry(384, 6),
    "deit_base_patch16_224": deit_geometry(768, 12),
}
FVCORE_REL_TOL = 1e-3  # the agreement the README states (measured: 0, to the MAC)


@pytest.fixture(scope="module")
def deit_small():
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224", pretrained=False).eval()


@pytest.mark.parametrize("name", GEOMETRIES)
def test_written_geometry_is_the_timm_one(name):
    with torch.device("meta"):
        assert Geometry.from_model(timm.create_model(name, pretrained=False)) == GEOMETRIES[name]


# --- analytic == fvcore ---------------------------------------------------------------------------

def fvcore_cases():
    cases = [(name, ratio, {}) for name in methods.available("vit") if name != "none" for ratio in (0.9, 0.7, 0.5)]
    cases.append(("none", 1.0, {}))
    cases += [("tome", 1.0, {"r": r}) for r in (8, 13, 16)]
    # Options that change what is counted.
    return cases + [("evit", 0.7, {"fuse": False}), ("idle", 0.7, {"cheap_score": True}),
                    ("topk", 0.7, {"score": "logit"})]


@pytest.mark.parametrize("name, ratio, options", fvcore_cases())
def test_analytic_agrees_with_fvcore(deit_small, name, ratio, options):
    model = methods.apply(copy.deepcopy(deit_small), name, ratio, **options)
    image = torch.randn((1, *DEIT_SHAPE[-3:]), generator=torch.Generator().manual_seed(0))
    counted = flops.fvcore_macs(model, DEIT_SHAPE, image=image)
    # ATS keeps a different count per image: the analytic count of the image fvcore traced.
    analytic = int(flops.per_image_macs(model, image)[0])
    assert abs(counted.total - analytic) <= FVCORE_REL_TOL * analytic, f"fvcore {counted.total} vs {analytic}"
    assert not any(flops.is_matmul_class(op) for op in counted.unsupported)
    assert int(flops.per_image_macs(model, image, include_overhead=False)[0]) <= analytic


def test_overhead_free_count_is_the_plain_cost_of_the_schedule():
    """No overhead = stock blocks on the scheduled tokens: IdleViT's idle block is a plain block on
    its n selected tokens, 12 n D^2 + 2 n^2 D (docs/methods.md#block-cost)."""
    g = GEOMETRIES["deit_small_patch16_224"]
    method = methods.build(g, "idle", 0.7)
    D = g.dim
    expected = 196 * 768 * D + 1000 * D
    for bt in method.schedule().blocks:
        n = bt.n_attn
        expected += 12 * n * D * D + 2 * n * n * D
    assert flops.analytic_macs(method, include_overhead=False) == expected


# --- published figures ----------------------------------------------------------------------------

# Published figures that our count, counted the paper's way, does not reproduce within half a printed digit,
# the one rule for every row (docs/protocol.md#published-figures); each is a strict xfail with the reason,
# so the test fails if one starts to match.
_TRUNCATED = ("DynamicViT prints its GMACs truncated to one decimal (4.0/3.4/2.9 for 4.041/3.463/2.981 with "
              "the predictors): the printed figure is up to 0.1 below ours; how it was rounded is shown in the "
              "report, never used to make a row pass")
KNOWN_MISMATCHES = {
    ("deit_small_patch16_224", "evit", 0.8, "fuse=false"):
        "the EViT README gives 3.5 G for both fusion variants at keep 0.8; without the fused token the "
        "model is 3.444 G (docs/methods.md#reference-counts), which rounds to 3.4",
    ("deit_small_patch16_224", "dynamicvit", 0.8, None): _TRUNCATED,
    ("deit_small_patch16_224", "ppt", 1.0, "r=50"):
        "PPT's README prints 2.944 GFLOPs counted with torchprofile, which also counts element-wise "
        "multiplications; the matrix products alone are 2.942 G, outside half a unit of the 4th decimal",
    ("deit_small_patch16_224", "dynamicvit", 0.7, None): _TRUNCATED,
    ("deit_base_patch16_224", "dynamicvit", 0.7, None): _TRUNCATED,
}


def published_rows():
    table = pd.read_csv(PUBLISHED)
    rows = []
    for _, row in table[table["gmacs"].notna()].iterrows():
        options = None if pd.isna(row["method_options"]) else row["method_options"]
        reason = KNOWN_MISMATCHES.get((row["model"], row["method"], row["keep_ratio"], options))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        rows.append(pytest.param(row, marks=marks))
    return rows


def parse_options(text) -> dict:
    if pd.isna(text) or not str(text).strip():
        return {}
    return dict(item.split("=", 1) for item in str(text).split(";"))


def test_published_table_is_well_formed():
    table = pd.read_csv(PUBLISHED)
    assert list(table.columns) == [
        "model", "method", "keep_ratio", "method_options", "top1", "regime", "gmacs", "gmacs_convention",
        "gmacs_rounding", "throughput", "throughput_conditions", "source",
    ]
    assert set(table["method"]) <= {"none", "evit", "topk", "dynamicvit", "tome", "idle", "ppt"}
    with_gmacs = table[table["gmacs"].notna()]
    assert set(with_gmacs["gmacs_convention"]) <= {"with_overhead", "no_overhead"}
    assert set(with_gmacs["gmacs_rounding"]) <= {"round", "truncate"}
    assert table["source"].notna().all()


@pytest.mark.parametrize("row", published_rows(),
                         ids=lambda r: f"{r['model']}-{r['method']}-{r['keep_ratio']}-{r['method_options']}")
def test_published_gmacs_match_the_analytic_count(row):
    method = methods.build(GEOMETRIES[row["model"]], row["method"], row["keep_ratio"],
                           **parse_options(row["method_options"]))
    ours = flops.analytic_macs(method, include_overhead=row["gmacs_convention"] == "with_overhead") / 1e9
    published = row["gmacs"]
    # One rule for every row: a figure printed with d decimals stands for +- half a unit of its last digit.
    tolerance = half_unit(repr(published))
    assert abs(ours - published) <= tolerance + 1e-9, f"ours {ours:.3f} vs published {published} (+-{tolerance})"


def test_dynamicvit_figures_are_not_rounded_counts():
    """Why three DynamicViT rows are known mismatches: no convention, with or without the predictors,
    rounds to all four printed figures (S/0.9 -> 4.0 needs the predictors, B/0.7 -> 11.4 is 11.06
    without them); truncation of the count with predictors fits them all."""
    figures = {("deit_small_patch16_224", 0.9): 4.0, ("deit_small_patch16_224", 0.8): 3.4,
               ("deit_small_patch16_224", 0.7): 2.9, ("deit_base_patch16_224", 0.7): 11.4}
    for include_overhead in (True, False):
        rounded = [round(flops.analytic_macs(methods.build(GEOMETRIES[m], "dynamicvit", r), include_overhead) / 1e9, 1)
                   for (m, r) in figures]
        assert rounded != list(figures.values())
    truncated = [int(flops.analytic_macs(methods.build(GEOMETRIES[m], "dynamicvit", r)) / 1e8) / 10 for (m, r) in figures]
    assert truncated == list(figures.values())


# --- the fvcore wrapper itself --------------------------------------------------------------------

def test_sdpa_handle_counts_fused_attention(deit_small):
    """fvcore has no SDPA handle: without ours fused attention vanishes (~4.25 G on DeiT-S)."""
    fused = copy.deepcopy(deit_small)
    explicit = copy.deepcopy(deit_small)
    for block in fused.blocks:
        block.attn.fused_attn = True
    for block in explicit.blocks:
        block.attn.fused_attn = False
    with_handle = flops.fvcore_macs(fused, DEIT_SHAPE)
    unfused = flops.fvcore_macs(explicit, DEIT_SHAPE)
    assert with_handle.total == unfused.total == flops.analytic_macs(methods.build(deit_small, "none"))
    assert with_handle.by_operator["scaled_dot_product_attention"] == 12 * 6 * 197 * 197 * (64 + 64)
    assert with_handle.total / 1e9 == pytest.approx(4.599, abs=0.001)
    assert not with_handle.by_operator.get("layer_norm")  # norms are left out, as in the analytic model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis
        plain = FlopCountAnalysis(fused, torch.randn(1, *DEIT_SHAPE))
        plain.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        assert plain.total() / 1e9 < 4.3


class BatchedAffine(nn.Module):
    def forward(self, x):  # (1, C, H, W) image -> (C, H, H)
        x = x.flatten(0, 1)
        return torch.baddbmm(x, x, x.transpose(1, 2))


def test_uncounted_matrix_product_raises():
    with pytest.raises(flops.FlopCountError, match="baddbmm"):
        flops.fvcore_macs(nn.Sequential(nn.Linear(4, 4), BatchedAffine()), (2, 4, 4))


@pytest.mark.parametrize("op, expected", [
    ("aten::matmul", True), ("aten::baddbmm", True), ("aten::addmv", True), ("aten::_convolution", True),
    ("aten::scaled_dot_product_attention", True), ("aten::einsum", True), ("aten::linear", True),
    ("aten::add", False), ("aten::softmax", False), ("aten::topk", False), ("aten::gelu", False),
    ("aten::scatter_reduce", False), ("aten::layer_norm", False),
])
def test_matmul_class(op, expected):
    assert flops.is_matmul_class(op) is expected
