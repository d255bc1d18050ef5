"""Where a finetuned DynamicViT loses accuracy: training path against eval path, and learned against random ranking.

    python scripts/dynamicvit_diagnose.py results/<run>/checkpoints/finetune-dynamicvit-0.5-<hash>.safetensors \
        --keep-ratio 0.5 --limit 2000

On the first `--limit` test images of the embedded model it prints
- top-1 of the eval path (the predictors' top-k, what every accuracy job measures);
- top-1 of the training path (Gumbel-sampled decisions, dropped tokens masked in attention), with the
  fraction of image tokens each stage keeps there (last batch of 500) next to its target r^s;
- the quantiles of the predicted keep probability per stage (near 0.5: the predictors barely rank);
- top-1 of the eval path with the predictors' scores replaced by random ones (same weights, same counts),
  which separates what the ranking adds from what finetuning the backbone did.
docs/methods.md#dynamicvit-on-the-embedded-model reports these figures.
"""
from __future__ import annotations

import argparse
import copy
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import methods  # noqa: E402
from bench import data, models  # noqa: E402
from bench.spec import EMBEDDED_DATA, EMBEDDED_MODEL  # noqa: E402
from methods.base import stagewise_ratios  # noqa: E402


def top1(model, images, labels, batch=500) -> float:
    with torch.no_grad():
        logits = torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item()


@contextmanager
def keep_probabilities(predictors):
    """Collect p(keep) of every token each predictor scores inside the `with` block, per stage."""
    seen = {stage: [] for stage in range(len(predictors))}
    hooks = [p.register_forward_hook(lambda _m, _i, out, s=stage: seen[s].append(out[..., 0].exp().flatten()))
             for stage, p in enumerate(predictors)]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def random_scores(predictors, seed: int):
    """The predictors answer with random log-probabilities: a random ranking at the same places and counts."""
    generator = torch.Generator().manual_seed(seed)
    for p in predictors:
        p.forward = lambda x, policy: torch.rand(x.shape[0], x.shape[1], 2, generator=generator).log()
    try:
        yield
    finally:
        for p in predictors:
            del p.forward  # back to the class's forward


def diagnose(student, images, labels, seed: int = 0) -> dict:
    """The figures above for a DynamicViT-patched model (structured; `main` prints them)."""
    method = student.token_reduction
    out = dict(eval_top1=top1(student.eval(), images, labels),
               targets=stagewise_ratios(method.keep_ratio, method.layers, layers_per_stage=1))
    torch.manual_seed(seed)
    with keep_probabilities(method.predictors) as seen:
        out["train_top1"] = top1(student.train(), images, labels)
        # decisions of the last batch: the training path's kept fraction per stage
        out["train_kept"] = [method.aux["decision"][layer].mean().item() for layer in method.layers]
    student.eval()
    levels = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    out["keep_prob_quantiles"] = [torch.quantile(torch.cat(chunks), levels).tolist() for chunks in seen.values()]
    with random_scores(method.predictors, seed):
        out["random_ranking_top1"] = top1(student, images, labels)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a finetune job's .safetensors (its student, predictors included), or "
                        "'released' for the released weights with untrained predictors")
    parser.add_argument("--keep-ratio", type=float, required=True)
    parser.add_argument("--limit", type=int, default=2000, help="first N test images (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Gumbel noise and of the random ranking")
    args = parser.parse_args(argv)

    base = models.create_model(EMBEDDED_MODEL, None, pretrained=True)
    student = methods.apply(copy.deepcopy(base), "dynamicvit", args.keep_ratio)
    if args.checkpoint != "released":
        student.load_state_dict(models.read_checkpoint(args.checkpoint))
    dataset = data.eval_dataset(EMBEDDED_DATA, student, args.limit)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    found = diagnose(student, images, labels, args.seed)
    print(f"eval path (top-k):          {found['eval_top1']:.2f} %")
    print(f"training path (Gumbel):     {found['train_top1']:.2f} %")
    print("kept in training vs target: " + ", ".join(
        f"{k:.3f}/{t:.3f}" for k, t in zip(found["train_kept"], found["targets"])))
    for stage, q in enumerate(found["keep_prob_quantiles"]):
        print(f"p(keep) stage {stage} quantiles 5/25/50/75/95 %: " + " ".join(f"{v:.3f}" for v in q))
    print(f"eval path, random ranking:  {found['random_ranking_top1']:.2f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
