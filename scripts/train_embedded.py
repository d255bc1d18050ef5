"""Train the embedded Fashion-MNIST ViT (`tokenbench_vit_fmnist`) from scratch on the CPU.

    python scripts/train_embedded.py            # the recipe that produced bench/assets/*.safetensors

Needs the full Fashion-MNIST train split (60,000 images; the repository ships only the first 20,000):
$TOKENBENCH_FASHION_MNIST, else Debian's dataset-fashion-mnist package, else torchvision's download
folder (see bench.data.full_fashion_mnist_dir). Tests on the shipped test split.

Reproducible: fixed seed, deterministic CPU kernels, the whole recipe in RECIPE and in the
JSON log written next to the checkpoint. Resumes from its last epoch if interrupted.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bench.data import DataError, full_fashion_mnist_dir, load_fashion_mnist, shipped_source  # noqa: E402
from bench.training.data import normalise, shift_and_flip  # noqa: E402  (the finetune job's, too)
from bench.models import EMBEDDED_CHECKPOINT, EMBEDDED_MODEL, FASHION_MNIST_MEAN, FASHION_MNIST_STD  # noqa: E402

RECIPE = dict(
    seed=0, epochs=25, batch_size=128, lr=1.5e-3, min_lr=1e-5, warmup_epochs=1, weight_decay=0.05,
    label_smoothing=0.1, pad=2, hflip=0.5, threads=2,
)


@torch.inference_mode()
def evaluate(model, images, labels, batch_size=1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(images[i:i + batch_size])
        correct += (logits.argmax(-1) == labels[i:i + batch_size]).sum().item()
    return 100.0 * correct / len(images)


def lr_at(step: int, total: int, warmup: int, r: dict) -> float:
    if step < warmup:
        return r["lr"] * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return r["min_lr"] + 0.5 * (r["lr"] - r["min_lr"]) * (1 + math.cos(math.pi * t))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    p.add_argument("--work-dir", type=Path, default=Path(__file__).resolve().parent / ".train_runs")
    p.add_argument("--out", type=Path, default=EMBEDDED_CHECKPOINT)
    p.add_argument("--max-steps", type=int, default=None, help="stop early (for timing the recipe)")
    args = p.parse_args(argv)
    recipe = dict(RECIPE, epochs=args.epochs)

    try:
        full = full_fashion_mnist_dir()
        train_x, train_y = load_fashion_mnist("train", full)
        if len(train_y) != 60_000:
            raise DataError(f"{full} holds {len(train_y)} training images, not the full 60,000")
        test_x, test_y = load_fashion_mnist("test")  # the shipped test split, byte for byte Zalando's
    except DataError as exc:
        print(f"train_embedded.py: {exc}", file=sys.stderr)
        return 2

    torch.manual_seed(recipe["seed"])
    torch.set_num_threads(recipe["threads"])
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(recipe["seed"])

    mean, std = FASHION_MNIST_MEAN[0], FASHION_MNIST_STD[0]
    train_x, test_x = normalise(train_x, mean, std), normalise(test_x, mean, std)

    model = timm.create_model(EMBEDDED_MODEL, pretrained=False)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    steps_per_epoch = len(train_x) // recipe["batch_size"]
    total, warmup = steps_per_epoch * recipe["epochs"], steps_per_epoch * recipe["warmup_epochs"]

    args.work_dir.mkdir(parents=True, exist_ok=True)
    state_file = args.work_dir / "last.pth"
    log = dict(recipe=recipe, command=" ".join(["python", "scripts/train_embedded.py"] + (argv or sys.argv[1:])),
               torch=torch.__version__, timm=timm.__version__, epochs=[],
               data=dict(train=str(full), test=shipped_source("test")))
    start_epoch = 0
    if state_file.exists():
        state = torch.load(state_file, weights_only=False)
        if state["recipe"] == recipe:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            torch.set_rng_state(state["rng"])
            log, start_epoch = state["log"], state["epoch"] + 1
            print(f"resuming after epoch {state['epoch']}")

    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, recipe["epochs"]):
        model.train()
        t0, seen, loss_sum = time.time(), 0, 0.0
        order = torch.randperm(len(train_x), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * recipe["batch_size"]:(i + 1) * recipe["batch_size"]]
            x = shift_and_flip(train_x[idx], gen, recipe["pad"], recipe["hflip"])
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, warmup, recipe)
            loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=recipe["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            if args.max_steps and step >= args.max_steps:
                print(f"{step} steps in {time.time() - t0:.1f}s ({(time.time() - t0) / step * steps_per_epoch:.0f}s/epoch)")
                return 0
        top1 = evaluate(model, test_x, test_y)
        entry = dict(epoch=epoch, train_loss=loss_sum / seen, test_top1=top1, seconds=time.time() - t0)
        log["epochs"].append(entry)
        print(json.dumps(entry), flush=True)
        torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), gen=gen.get_state(),
                        rng=torch.get_rng_state(), log=log, epoch=epoch, recipe=recipe), state_file)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out))
    log["final_test_top1"] = log["epochs"][-1]["test_top1"]
    args.out.with_suffix(".json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"wrote {args.out} (test top-1 {log['final_test_top1']:.2f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
