"""No method writes into a tensor it did not allocate: what a forward hook or `forward_intermediates`
received as one block's output is still that output after the later blocks have run."""
import copy

import pytest
import torch

import methods
from random_vits import MODELS, random_images

METHODS = [(m, "cls") for m in methods.available("vit")] + [
    (m, "gap") for m in methods.available("vit") if not methods.get_method(m).needs_cls
]  # the Swin methods: tests/test_swin_identity.py


@pytest.fixture(scope="module")
def stock_models():
    return {name: MODELS[name]() for name in ("cls", "gap")}


def cloned_block_outputs(model, images):
    """Each block's output, cloned before the next block runs (the ground truth). Random keep-K ranks
    these images as the first of its eval stream again, as in the forward it is compared with."""
    if hasattr(model.token_reduction, "restart_stream"):
        model.token_reduction.restart_stream()
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    outputs = []
    for block in model.blocks:
        x = block(x)
        outputs.append(x.clone())
    return outputs


@pytest.mark.parametrize("method, model_name", METHODS)
@torch.no_grad()
def test_hooked_block_outputs_are_not_written_later(stock_models, method, model_name):
    model = methods.apply(copy.deepcopy(stock_models[model_name]), method, 0.5)
    images = random_images(2, seed=3)
    hooked = []
    handles = [block.register_forward_hook(lambda module, args, output: hooked.append(output))
               for block in model.blocks]
    model(images)
    for handle in handles:
        handle.remove()
    expected = cloned_block_outputs(model, images)
    assert len(hooked) == len(expected)
    for i, (seen, truth) in enumerate(zip(hooked, expected)):
        assert torch.equal(seen, truth), f"block {i}: max |delta| = {(seen - truth).abs().max().item():.3g}"


@pytest.mark.parametrize("method, model_name", METHODS)
@torch.no_grad()
def test_forward_intermediates_are_not_written_later(stock_models, method, model_name):
    model = methods.apply(copy.deepcopy(stock_models[model_name]), method, 0.5)
    images = random_images(2, seed=4)
    intermediates = model.forward_intermediates(images, norm=False, output_fmt="NLC", intermediates_only=True)
    expected = cloned_block_outputs(model, images)
    prefix = model.num_prefix_tokens  # forward_intermediates returns the image tokens only
    assert len(intermediates) == len(expected)
    for i, (seen, truth) in enumerate(zip(intermediates, expected)):
        assert torch.equal(seen, truth[:, prefix:]), f"block {i}"
