"""Every registered method on several timm ViT families: keep ratio 1 reproduces the stock logits bit
for bit, a sample's logits do not depend on the rest of its batch, and models without a CLS token
are refused by CLS-scored methods and accepted by the others."""
import copy

import pytest
import timm
import torch

import methods
from methods import MethodError

# (timm name, img_size): CLS only; AugReg ViT; LayerScale (DeiT-III); CLS + distillation token;
# CLS + 4 registers with LayerScale (DINOv2). Small images keep the tests fast.
MODELS = [
    ("deit_tiny_patch16_224", 64),
    ("vit_small_patch16_224", 64),
    ("deit3_small_patch16_224", 64),
    ("deit_small_distilled_patch16_224", 64),
    ("vit_small_patch14_reg4_dinov2", 56),
]
BATCH_ATOL = 1e-5  # batch size changes the fp32 kernels' blocking, so not bit for bit

_stock_cache: dict[str, torch.nn.Module] = {}


def stock(name: str, img_size: int) -> torch.nn.Module:
    if name not in _stock_cache:
        torch.manual_seed(0)
        _stock_cache[name] = timm.create_model(name, pretrained=False, img_size=img_size).eval()
    return _stock_cache[name]


def identity_options(method: str) -> dict:
    """ToMe's keep ratio is its r: ask for r = 0 explicitly."""
    return {"r": 0} if "r" in methods.get_method(method).options else {}


def images(img_size: int, batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))


VIT_METHODS = methods.available("vit")  # the Swin methods: tests/test_swin_identity.py


@pytest.mark.parametrize("model_name, img_size", MODELS)
@pytest.mark.parametrize("method", VIT_METHODS)
@torch.no_grad()
def test_keep_ratio_one_is_the_stock_model(method, model_name, img_size):
    base = stock(model_name, img_size)
    model = methods.apply(copy.deepcopy(base), method, 1.0, **identity_options(method)).eval()
    x = images(img_size, 2)
    got, want = model(x), base(x)
    assert torch.equal(got, want), f"max |delta logits| = {(got - want).abs().max().item():.3g}"


@pytest.mark.parametrize("model_name, img_size", MODELS)
@pytest.mark.parametrize("method", VIT_METHODS)
@torch.no_grad()
def test_sample_does_not_depend_on_its_batch(method, model_name, img_size):
    model = methods.apply(copy.deepcopy(stock(model_name, img_size)), method, 0.5).eval()
    batch = images(img_size, 4, seed=1)
    together = model(batch)
    for b in (0, 3):
        if hasattr(model.token_reduction, "restart_stream"):  # random draws by the sample's place in the
            model.token_reduction.restart_stream(b)             # eval stream: put it back there
        alone = model(batch[b:b + 1])
        delta = (alone[0] - together[b]).abs().max().item()
        assert delta <= BATCH_ATOL, f"sample {b}: max |delta logits| = {delta:.3g}"


# --- a global-average-pool model without a CLS token ----------------------------------------------

@pytest.fixture(scope="module")
def gap_model():
    torch.manual_seed(0)
    # The stock architecture (4 registers, no class token, average pooling) at a small width.
    model = timm.create_model("vit_base_patch16_reg4_gap_256", pretrained=False, img_size=64,
                              embed_dim=64, num_heads=2).eval()
    assert model.cls_token is None and model.global_pool == "avg" and model.num_prefix_tokens == 4
    return model


CLS_METHODS = [m for m in VIT_METHODS if methods.get_method(m).needs_cls]
FREE_METHODS = [m for m in VIT_METHODS if not methods.get_method(m).needs_cls]


@pytest.mark.parametrize("method", CLS_METHODS)
def test_cls_scored_method_refuses_a_gap_model(gap_model, method):
    with pytest.raises(MethodError, match=r"CLS token.*no(ne)?\b") as err:
        methods.apply(copy.deepcopy(gap_model), method, 0.5)
    message = str(err.value)
    assert "\n" not in message and method in message
    for other in FREE_METHODS:  # the message names the methods that work
        assert other in message


@pytest.mark.parametrize("method", FREE_METHODS)
@torch.no_grad()
def test_cls_free_method_runs_on_a_gap_model(gap_model, method):
    x = images(64, 2)
    model = methods.apply(copy.deepcopy(gap_model), method, 1.0, **identity_options(method)).eval()
    assert torch.equal(model(x), gap_model(x))
    reduced = methods.apply(copy.deepcopy(gap_model), method, 0.5).eval()
    out = reduced(x)
    assert out.shape == (2, gap_model.num_classes) and torch.isfinite(out).all()
