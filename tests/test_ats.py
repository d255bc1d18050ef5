"""ATS against a per-sample reference written here from docs/methods.md#ats (not from methods/ats.py): the
tokens each image keeps, its logits, its per-image counts and analytic MACs against fvcore traced on that one
image; batch independence with padding; the distribution over a set of images."""
import copy

import pytest
import torch

import methods
from methods import DROPPED, KEPT, MethodError, flops
from methods.ats import inverse_transform_sample
from random_vits import IMG, REFERENCE_TOL, in_dtype, models, random_images, timm_geometry  # noqa: F401  (fixture)

N0 = (IMG // 16) ** 2  # 36 patches


# ---------------------------------------------------------------------------------------------
# Reference: one image at a time, python lists and loops

def reference_sampling(scores: list[float], samples: int) -> list[int]:
    """Indices into `scores` of the sampled tokens, in ascending significance."""
    total = sum(scores)
    s = [v / total for v in scores]
    order = sorted(range(len(s)), key=lambda j: (s[j], j))  # ascending, ties by position
    cdf, running = [], 0.0
    for j in order:
        running += s[j]
        cdf.append(running)
    low, high = cdf[0], max(cdf)
    hat = [(c - low) / (high - low) if high > low else 0.0 for c in cdf]
    positive = [h for h in hat if h > 0]
    start = min(positive) if positive else 1.0
    ys = [start + t * (1.0 - start) / max(samples - 1, 1) for t in range(samples)]
    picked = set()
    for y in ys:
        distances = [abs(y - h) for h in hat]
        picked.add(distances.index(min(distances)))  # the first nearest
    return [order[p] for p in sorted(picked)]


def reference_ats_block(block, tokens, samples, prefix):
    """tokens (N, D) -> (P + u, D) and the kept positions (prefix first, then ascending significance)."""
    attn = block.attn
    N = tokens.shape[0]
    H, d = attn.num_heads, attn.head_dim
    normed = block.norm1(tokens)
    q, k, v = attn.qkv(normed).reshape(N, 3, H, d).unbind(1)  # (N, H, d) each
    q, k = attn.q_norm(q.transpose(0, 1)).transpose(0, 1), attn.k_norm(k.transpose(0, 1)).transpose(0, 1)
    weights = (torch.einsum("ihd,jhd->hij", q, k) * d ** -0.5).softmax(-1)  # (H, N, N)
    value_norm = v.reshape(N, H * d).norm(dim=-1)
    scores = [float(weights[:, 0, j].sum() * value_norm[j]) for j in range(prefix, N)]
    keep = list(range(prefix)) + [prefix + j for j in reference_sampling(scores, samples)]
    mixed = torch.einsum("hij,jhd->ihd", weights[:, keep], v).reshape(len(keep), H * d)
    out = tokens[keep] + block.ls1(attn.proj(attn.norm(mixed)))
    return out + block.ls2(block.mlp(block.norm2(out))), keep


def reference_forward(stock, images, samples, layers):
    prefix = stock.num_prefix_tokens
    logits, kept, counts = [], [], []
    for image in images:
        x = stock.norm_pre(stock._pos_embed(stock.patch_embed(image[None])))[0]
        picked, n = {}, {}
        for i, block in enumerate(stock.blocks):
            if i in layers:
                x, picked[i] = reference_ats_block(block, x, samples, prefix)
                n[i] = len(picked[i])
            else:
                x = block(x[None])[0]
        logits.append(stock.forward_head(stock.norm(x[None]))[0])
        kept.append(picked)
        counts.append(n)
    return torch.stack(logits), kept, counts


# ---------------------------------------------------------------------------------------------

def test_sampling_by_hand():
    """s = (.4, .1, .3, .2): ascending tokens 1, 3, 2, 0 with cdf .1, .3, .6, 1 -> cdf_hat 0, 2/9, 5/9, 1;
    K = 4 samples at 2/9, 13/27, 20/27, 1 pick tokens 3, 2, 2, 0: three tokens, the least significant never."""
    scores = torch.tensor([[0.4, 0.1, 0.3, 0.2]], dtype=torch.float64)
    positions, counts, slot_valid = inverse_transform_sample(scores, torch.ones_like(scores, dtype=torch.bool), 4)
    assert positions.tolist() == [[3, 2, 0]] and counts.tolist() == [3] and slot_valid.all()
    assert reference_sampling([0.4, 0.1, 0.3, 0.2], 4) == [3, 2, 0]
    # The same row padded (and a second row with one token), in one batch: the same selection.
    padded = torch.tensor([[0.4, 0.1, 0.3, 0.2, 9.0, 9.0], [0.0, 0.0, 5.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    valid = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    positions, counts, slot_valid = inverse_transform_sample(padded, valid, 4)
    assert counts.tolist() == [3, 1]
    assert positions[0].tolist() == [3, 2, 0] and positions[1, 0] == 2 and slot_valid.tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("model_name", ["cls", "distilled", "registers"])
@pytest.mark.parametrize("ratio, options", [(0.7, {}), (0.5, {}), (1.0, {"samples": N0})],
                         ids=["r0.7", "r0.5", "official-K"])
@torch.no_grad()
def test_eval_matches_per_sample_reference(models, model_name, ratio, options):
    stock = models[model_name]
    model = methods.apply(copy.deepcopy(stock), "ats", ratio, **options)
    method = model.token_reduction
    method.state.trace = True
    images = random_images(4, seed=5)
    out = model(images)
    samples = options.get("samples", int(N0 * ratio))
    assert method.samples == samples and method.layers == tuple(range(3, 12))
    expected, kept, counts = reference_forward(stock, images, samples, method.layers)
    prefix = stock.num_prefix_tokens
    for b in range(len(images)):
        for block in method.layers:
            n = method.aux["tokens_out"][block][b].item()
            assert n == counts[b][block]
            assert method.aux["kept"][block][b, :n].tolist() == kept[b][block]
        assert method.image_schedules()[b].tokens_attn[3:] == tuple(counts[b][i] for i in method.layers)
    assert (out - expected).abs().max() <= REFERENCE_TOL[torch.float64]
    ends = method.tokens_per_image()[:, -1]
    assert ((ends > prefix) & (ends <= prefix + samples)).all()


@torch.no_grad()
def test_one_ats_block_and_padded_stock_blocks_after_it(models):
    """With ATS in block 3 only, blocks 4-11 are stock blocks that mask the batch's padding."""
    stock = models["cls"]
    model = methods.apply(copy.deepcopy(stock), "ats", 1.0, layers=[3], samples=N0)
    images = random_images(4, seed=13)
    expected, _, counts = reference_forward(stock, images, N0, (3,))
    assert len({c[3] for c in counts}) > 1  # the batch is padded
    assert (model(images) - expected).abs().max() <= REFERENCE_TOL[torch.float64]


@torch.no_grad()
def test_fp32_matches_reference(models):
    stock = in_dtype(models["cls"], torch.float32)
    model = methods.apply(copy.deepcopy(stock), "ats", 0.6)
    images = random_images(3, seed=6, dtype=torch.float32)
    expected, _, _ = reference_forward(stock, images, int(N0 * 0.6), tuple(range(3, 12)))
    assert (model(images) - expected).abs().max() <= REFERENCE_TOL[torch.float32]


@torch.no_grad()
def test_counts_differ_per_image_and_not_per_batch(models):
    model = methods.apply(copy.deepcopy(models["cls"]), "ats", 1.0, samples=N0)
    method = model.token_reduction
    method.state.trace = True
    images = random_images(6, seed=7)
    together = model(images)
    batched = method.tokens_per_image().clone()
    macs = method.macs_per_image()
    assert len(set(batched[:, -1].tolist())) > 1  # the images keep different counts
    for b in range(len(images)):
        alone = model(images[b:b + 1])
        assert torch.equal(method.tokens_per_image()[0], batched[b])
        assert method.macs_per_image()[0] == macs[b]
        assert (alone[0] - together[b]).abs().max() <= 1e-12


def test_analytic_macs_of_each_image_equal_fvcore_on_that_image(models):
    model = methods.apply(copy.deepcopy(models["cls"]), "ats", 0.8)
    images = random_images(3, seed=8)
    per_image = flops.per_image_macs(model, images)
    assert len(set(per_image.tolist())) > 1
    for b in range(len(images)):
        assert flops.fvcore_macs(model, images.shape, image=images[b]).total == per_image[b]
    bound = flops.analytic_macs(model.token_reduction)  # the static count: every ATS block at min(K, n)
    assert (per_image <= bound).all()


def test_distribution_over_images(models):
    model = methods.apply(copy.deepcopy(models["cls"]), "ats", 0.7)
    batches = [random_images(3, seed=9), random_images(2, seed=10)]
    dist = flops.macs_distribution(model, batches)
    every = torch.cat([flops.per_image_macs(model, b) for b in batches])
    assert dist.images == 5 and dist.min == every.min() and dist.max == every.max()
    assert dist.mean == pytest.approx(every.double().mean().item())
    plain = methods.apply(copy.deepcopy(models["cls"]), "evit", 0.7)  # a static method: the same count for each
    static = flops.macs_distribution(plain, batches)
    assert static.min == static.max == flops.analytic_macs(plain.token_reduction)


@torch.no_grad()
def test_patch_states_follow_the_kept_tokens(models):
    model = methods.apply(copy.deepcopy(models["registers"]), "ats", 0.6)
    method = model.token_reduction
    method.state.trace = True
    model(random_images(3, seed=11))
    prefix = 5
    previous = None
    for block in method.layers:
        state = method.aux["patch_state"][block]
        assert state.shape == (3, N0) and set(state.unique().tolist()) <= {KEPT, DROPPED}
        assert ((state == KEPT).sum(1) == method.aux["tokens_out"][block] - prefix).all()
        if previous is not None:  # dropped is dropped for good
            assert not ((state == KEPT) & (previous != KEPT)).any()
        previous = state


def test_static_schedule_is_the_upper_bound():
    g = timm_geometry("deit_small_patch16_224")
    method = methods.build(g, "ats", 0.5)
    assert method.samples == 98
    assert method.schedule().tokens_attn == (197,) * 3 + (99,) * 9
    official = methods.build(g, "ats", 1.0, samples=196)
    assert official.schedule().tokens_attn == (197,) * 12 and official.adaptive
    assert not methods.build(g, "ats", 1.0).adaptive  # the stock model
    assert "upper bounds" in method.describe()["notes"][0]
    with pytest.raises(MethodError, match="trace"):
        method.image_schedules()


def test_training_runs_the_sampling_path_and_trains_the_weights(models):
    stock = in_dtype(models["cls"], torch.float32)
    model = methods.apply(copy.deepcopy(stock), "ats", 0.6)
    images = random_images(3, seed=12, dtype=torch.float32)
    with torch.no_grad():
        evaluated = model(images)
    model.train()
    trained = model(images)
    assert (trained - evaluated).abs().max() <= 1e-6  # no dropout in these models: the same path
    trained.square().mean().backward()
    assert model.blocks[5].attn.qkv.weight.grad.abs().sum() > 0
    assert set(model.token_reduction.aux["tokens_out"]) == set(range(3, 12))  # recorded in training too


def test_bad_samples():
    with pytest.raises(MethodError, match="samples=0"):
        methods.build(timm_geometry("deit_small_patch16_224"), "ats", 0.5, samples=0)


# --- the FLOPs job ----------------------------------------------------------------------------------

def test_flops_job_reports_the_distribution_over_the_eval_images(tmp_path):
    """An adaptive method's FLOPs job keeps the weights and data in its key, loads the weights the accuracy
    job would, and reports the mean over the eval images with their min, max and how it was averaged."""
    from bench import jobs
    from bench.jobs import JobContext
    from bench.spec import JobSpec

    kind = jobs.get("flops")
    asked = JobSpec(kind="flops", model="tokenbench_vit_fmnist", method="ats", keep_ratio=0.7, limit=40,
                    checkpoint=None, batch_size=7)
    spec = kind.normalise(asked)
    assert spec.limit == 40 and spec.batch_size == 1  # the data is in the key, the batch size is not
    assert kind.normalise(JobSpec(kind="flops", model="tokenbench_vit_fmnist", method="idle", limit=40)).limit is None
    kind.validate(spec)
    record = kind.run(spec, JobContext(tmp_path, {}))
    assert record["gmacs_images"] == 40
    assert record["gmacs_min"] <= record["gmacs"] <= record["gmacs_max"] <= record["gmacs_bound"]
    assert record["gmacs_fvcore"] == record["gmacs_fvcore_image"] and record["fvcore_agrees"]
    assert "40 eval images" in record["gmacs_averaging"]
    assert record["gmacs_no_overhead"] < record["gmacs"]
