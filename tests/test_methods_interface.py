"""The `methods` package interface: the registry, the layer-resolution hook, and the canonical
spelling of a configuration (so that a default spelled out equals the default left out)."""
import ast
import inspect
from pathlib import Path

import pytest

import methods
from methods import CanonicalConfig, MethodError, canonical_config
from methods.idle import IdleViT
from random_vits import timm_geometry

METHODS_DIR = Path(methods.__file__).resolve().parent


def test_registered_methods_are_exactly_these():
    assert methods.available() == ["none", "idle", "evit", "topk", "dynamicvit", "tome", "random",
                                   "pitome", "tofu", "mctf", "ppt", "zerotprune", "ats", "idle-swin",
                                   "dynamicvit-swin"]
    assert methods.available("swin") == ["none", "idle-swin", "dynamicvit-swin"]
    assert methods.available("vit") == methods.available()[:13]


def test_a_method_of_another_family_is_refused_naming_the_ones_that_fit():
    g = timm_geometry("deit_small_patch16_224")
    with pytest.raises(MethodError, match=r"idle-swin patches swin models.*vit model; valid for it: none, idle,"):
        methods.build(g, "idle-swin", 0.7)
    swin = timm_geometry("swin_tiny_patch4_window7_224")
    with pytest.raises(MethodError, match=r"method idle patches vit models.*valid for it: none, idle-swin, "
                                          r"dynamicvit-swin$"):
        methods.build(swin, "idle", 0.7)


def test_methods_never_import_bench():
    for path in sorted(METHODS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n == "bench" or n.startswith("bench.") for n in names), path.name


# --- default layers: a hook per method, nothing method-specific in base.py --------------------------

def test_resolve_layers_default_is_the_first_preset():
    assert methods.get_method("evit").resolve_layers(12, {"fuse": True}) == (3, 6, 9)
    assert methods.get_method("tome").resolve_layers(4, {}) == (0, 1, 2, 3)
    assert methods.get_method("none").resolve_layers(12, {}) == ()


def test_idle_resolves_its_preset_through_the_hook():
    assert IdleViT.resolve_layers(12, {"preset": "infer"}) == tuple(range(3, 12))
    assert IdleViT.resolve_layers(12, {"preset": "main"}) == tuple(range(4, 12))
    g = timm_geometry("deit_small_patch16_224")
    assert methods.build(g, "idle", 0.7, preset="main").layers == tuple(range(4, 12))
    assert '"preset"' not in inspect.getsource(methods.base)  # base.py reads no method's options


# --- canonical configuration ---------------------------------------------------------------------

@pytest.mark.parametrize("name, depth, layers, options, expected", [
    # IdleViT: the default layers spelled out, a preset spelled as layers, and the reverse
    ("idle", 12, None, {}, (None, {})),
    ("idle", 12, range(3, 12), {}, (None, {})),
    ("idle", 12, [11, 10, 9, 8, 7, 6, 5, 4, 3], {}, (None, {})),
    ("idle", 12, None, {"preset": "infer"}, (None, {})),
    ("idle", 12, range(4, 12), {}, (None, {"preset": "main"})),
    ("idle", 12, None, {"preset": "main"}, (None, {"preset": "main"})),
    ("idle", 12, range(3, 12), {"preset": "main"}, (None, {})),  # explicit layers: the preset picks nothing
    ("idle", 12, (2, 5), {"preset": "main"}, ((2, 5), {})),
    ("idle", 12, None, {"layers_per_stage": "3"}, (None, {})),  # ceil(9 / 3) is the default
    ("idle", 12, None, {"layers_per_stage": 2}, (None, {"layers_per_stage": 2})),
    # cheap_score defaults to None (cheap unless the model has k_norm): false is the official path, kept
    ("idle", 12, None, {"cheap_score": "false"}, (None, {"cheap_score": False})),
    ("idle", 12, None, {"cheap_score": "yes"}, (None, {"cheap_score": True})),
    ("idle", 16, range(4, 16), {}, (None, {})),
    # EViT / Top-K / random / DynamicViT: options equal to their defaults, layers relative to depth
    ("evit", 12, None, {"fuse": "true"}, (None, {})),
    ("evit", 12, None, {"fuse": "0"}, (None, {"fuse": False})),
    ("evit", 12, [9, 3, 6], {}, (None, {})),
    ("evit", 16, (3, 6, 9), {}, ((3, 6, 9), {})),
    ("topk", 12, None, {"score": "prob"}, (None, {})),
    ("topk", 12, None, {"score": "logit"}, (None, {"score": "logit"})),
    ("random", 12, None, {"seed": "0"}, (None, {})),
    ("random", 12, None, {"seed": "7"}, (None, {"seed": 7})),
    ("dyvit", 12, (3, 6, 9), {}, (None, {})),
    ("dynamicvit", 12, (3, 6), {}, ((3, 6), {})),
    # ToMe: every block by default; r coerced
    ("tome", 12, range(12), {"prop_attn": "true"}, (None, {})),
    ("tome", 12, None, {"r": "8"}, (None, {"r": 8})),
    ("tome", 12, None, {"r": "8,4"}, (None, {"r": (8, 4)})),
    ("none", 12, None, {}, (None, {})),
    # the training-free methods of issue 16: default layers per depth, options equal to their defaults
    ("pitome", 12, range(12), {"margin": "0.9", "prop_attn": "false"}, (None, {})),
    ("pitome", 12, None, {"ratio": "0.95"}, (None, {"ratio": 0.95})),
    ("tofu", 12, None, {"merge_from": "7"}, (None, {"merge_from": 7})),
    ("tofu", 12, range(12), {"r": "8"}, (None, {"r": 8})),
    ("mctf", 12, range(1, 12), {"tau_info": "20", "bidirection": "1", "pooling": "attention"}, (None, {})),
    ("mctf", 16, range(1, 16), {}, (None, {})),
    ("mctf", 12, range(12), {}, (tuple(range(12)), {})),
    ("ppt", 12, (9, 3, 6), {"threshold": "7e-5"}, (None, {})),
    ("ppt", 12, None, {"r": "50"}, (None, {"r": 50})),
    ("zero-tprune", 12, None, {"iterations": "30"}, (None, {})),
    ("zerotprune", 12, None, {"iterations": 5}, (None, {"iterations": 5})),
    # issue 15: ATS; IdleViT and DynamicViT on Swin (default layers from the stage layout (2, 2, L - 6, 2))
    ("ats", 12, range(3, 12), {"samples": None}, (None, {})),
    ("ats", 12, None, {"samples": "196"}, (None, {"samples": 196})),
    ("idle-swin", 12, range(5, 10), {"preset": "stage3", "score": "query"}, (None, {})),
    ("idle-swin", 12, range(5, 12), {}, (None, {"preset": "stage34"})),
    ("idle-swin", 24, None, {"preset": "stage34"}, (None, {"preset": "stage34"})),
    ("idle-swin", 24, range(5, 22), {"layers_per_stage": "6"}, (None, {})),  # ceil(17 / 3)
    ("idle-swin", 12, (5, 6), {"idle_kv": "yes", "score": "predictor"},
     ((5, 6), {"idle_kv": True, "score": "predictor"})),
    ("dyswin", 12, (5, 6, 7), {}, (None, {})),
    ("dynamicvit-swin", 24, (6, 8, 10), {}, (None, {})),
    ("dynamicvit-swin", 12, (5, 6), {}, ((5, 6), {})),
])
def test_canonical_config(name, depth, layers, options, expected):
    got = canonical_config(name, depth, layers, **options)
    assert isinstance(got, CanonicalConfig)
    assert (got.layers, got.options) == expected
    assert canonical_config(name, depth, got.layers, **got.options) == got  # a fixed point


@pytest.mark.parametrize("name, layers, options", [
    ("idle", range(3, 12), {"preset": "main", "layers_per_stage": "3"}),
    ("idle", range(4, 12), {"cheap_score": "true"}),
    ("evit", (9, 3, 6), {"fuse": "false"}),
    ("tome", None, {"r": "5", "prop_attn": "1"}),
    ("pitome", range(12), {"ratio": "0.9", "alpha": "1"}),
    ("mctf", range(1, 12), {"r": "12", "pooling": "attention"}),
    ("ppt", (3, 6, 9), {"r": "40", "threshold": "7e-5"}),
    ("ats", range(3, 12), {"samples": "100"}),
    ("idle-swin", range(5, 12), {"layers_per_stage": "3", "score": "predictor"}),
    ("dynamicvit-swin", (5, 6, 7), {}),
])
def test_canonical_config_builds_the_same_method(name, layers, options):
    family = methods.get_method(name).families[0]
    g = timm_geometry("swin_tiny_patch4_window7_224" if family == "swin" else "deit_small_patch16_224")
    canonical = canonical_config(name, g.depth, layers, **options)
    original = methods.build(g, name, 0.6, layers, **options).describe()
    rebuilt = methods.build(g, name, 0.6, canonical.layers, **canonical.options).describe()
    del original["options"], rebuilt["options"]  # spelled differently on purpose; all they decide is equal
    assert original == rebuilt


@pytest.mark.parametrize("name, layers, options, match", [
    ("evit", None, {"fuze": True}, "unknown option 'fuze'"),
    ("evit", (3, 12), {}, "layer 12 is outside"),
    ("topk", None, {"score": "probs"}, "score='probs'"),
    ("idle", None, {"layers_per_stage": 0}, "layers_per_stage=0"),
    ("idle-swin", None, {"score": "cls"}, "score='cls'"),
    ("ats", None, {"samples": "many"}, "samples='many'"),
    ("nope", None, {}, "unknown method"),
])
def test_canonical_config_refuses_what_build_refuses(name, layers, options, match):
    with pytest.raises(MethodError, match=match):
        canonical_config(name, 12, layers, **options)
