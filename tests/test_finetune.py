"""Finetuning: the losses by hand, gradients where they belong, resume with identical state, DDP against one
process, recipes and their keys, and a finetune -> accuracy dependency end to end."""
from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import methods
import run_all
from bench import models, records
from bench.training import loop, objective
from bench.training.data import TrainSet
from bench.training.distributed import Processes
from bench.training.recipe import EMBEDDED_TRAIN, RecipeError, canonical, regime_label, resolve
from methods.idle import token_cut_loss

EMBEDDED = models.EMBEDDED_MODEL


# ---------------------------------------------------------------------------------------------
# The token-cut loss on a 4-token toy example (CLS + 3 image tokens), by hand

def test_token_cut_loss_by_hand():
    """Uniform logits give W = 1/4 everywhere. Mask m = (1, 1, 0, 1): token 2 is idle.
    inter_i = sum_j |m_i - m_j| W_ij over j >= 1 (CLS exempt): 1/4, 1/4, 1/2, 1/4 -> MSE to 0 = 7/64.
    intra_i = sum_j m_i m_j W_ij: 3/4, 3/4, 0, 3/4 against m -> (1/16 + 1/16 + 0 + 1/16) / 4 = 3/64."""
    aux = {"idle_mask": {3: torch.tensor([[1.0, 1.0, 0.0, 1.0]])}, "attn_logits": {3: torch.zeros(1, 2, 4, 4)}}
    assert token_cut_loss(aux, 1, "inter").item() == pytest.approx(7 / 64, abs=1e-7)
    assert token_cut_loss(aux, 1, "intra").item() == pytest.approx(3 / 64, abs=1e-7)
    assert token_cut_loss(aux, 1, "both").item() == pytest.approx(10 / 64, abs=1e-7)
    assert token_cut_loss(aux, 2, "both").item() == pytest.approx(5 / 64, abs=1e-7)  # divided by the idle layers
    # A selected token attending only to selected tokens (and CLS) costs nothing: logits -inf on the idle column.
    logits = torch.zeros(1, 1, 4, 4)
    logits[..., 2] = -1e9
    aux["attn_logits"][3] = logits
    inter_rows = torch.tensor([0.0, 0.0, 2 / 3, 0.0])  # the idle row still sees tokens 1 and 3 (1/3 each)
    assert token_cut_loss(aux, 1, "inter").item() == pytest.approx(float((inter_rows ** 2).mean()), abs=1e-7)


# ---------------------------------------------------------------------------------------------
# A small trainer on the embedded model and the shipped training subset

RECIPE = dict(epochs=1, train_limit=64, batch_size=16, lr=1e-3, warmup_epochs=0, label_smoothing=0.1)


def trainer(method: str, tmp_path, keep: float = 0.7, processes: Processes = Processes(), **settings) -> loop.Trainer:
    torch.manual_seed(0)
    teacher = models.create_model(EMBEDDED, pretrained=True)
    student = methods.apply(copy.deepcopy(teacher), method, keep)
    recipe = resolve(method, dict(RECIPE, **settings))
    train = TrainSet(EMBEDDED_TRAIN, student, seed=0, limit=recipe["train_limit"])
    teacher = teacher.eval().requires_grad_(False) if recipe["distill"] != "none" else None
    return loop.Trainer(student, teacher, train, recipe, "cpu", "fp32", processes, tmp_path / "ckpt", progress=False)


def test_gradients_reach_the_predictors_and_the_backbone_waits_in_the_predictor_only_phase(tmp_path):
    run = trainer("dynamicvit", tmp_path, predictor_only_fraction=0.5)  # 4 updates: the first 2 predictor-only
    before = {n: p.detach().clone() for n, p in run.student.named_parameters()}
    seen = {}

    def after_step(*args):
        seen[run.state.batches_done] = {n: p.detach().clone() for n, p in run.student.named_parameters()}
        seen.setdefault("grads", {n: p.grad for n, p in run.student.named_parameters()})

    run.optimizer.register_step_post_hook(after_step)
    run.run()
    first = seen[0]  # the state right after the first update (batches_done not yet counted)
    grads = seen["grads"]
    changed = {n for n in first if not torch.equal(first[n], before[n])}
    assert changed and all(n.startswith("score_predictor.") for n in changed)  # only the predictors moved
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in changed)
    for frozen in ("cls_token", "pos_embed"):  # the official recipe freezes them: never a gradient
        assert grads[frozen] is None and torch.equal(run.student.state_dict()[frozen], before[frozen])
    last = dict(run.student.named_parameters())
    assert not torch.equal(last["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])  # later: all


def test_losses_of_each_method_are_in_the_curve(tmp_path):
    for method, terms in (("idle", {"ce", "kl", "feature", "cut"}), ("dynamicvit", {"ce", "kl", "ratio", "tokens"}),
                          ("evit", {"ce"}), ("tome", {"ce"})):
        run = trainer(method, tmp_path / method, epochs=0.25)
        progress = run.run()
        assert set(progress.curve[-1]["loss"]) == terms | {"total"}, method


def test_an_interrupted_job_resumes_at_the_right_step_with_equal_state(tmp_path, monkeypatch):
    whole = trainer("idle", tmp_path / "whole", checkpoint_every=1)
    whole.run()
    reference = {k: v.clone() for k, v in whole.student.state_dict().items()}

    calls = {"n": 0}
    real = objective.loss_terms

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # during the 3rd batch: two updates are checkpointed
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "loss_terms", interrupted)
    first = trainer("idle", tmp_path / "split", checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        first.run()
    monkeypatch.setattr(loop, "loss_terms", real)
    second = trainer("idle", tmp_path / "split", checkpoint_every=1)  # a fresh process, as after a requeue
    progress = second.run()
    assert progress.resumed_at == [2]
    for name, value in second.student.state_dict().items():
        assert torch.equal(value, reference[name]), name
    assert second.optimizer.state_dict()["state"].keys() == whole.optimizer.state_dict()["state"].keys()
    assert [e["batches"] for e in progress.curve] == [e["batches"] for e in whole.state.curve]


def _train_in_process(rank: int, world: int, port: int, tmp_path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        run = trainer("evit", tmp_path / f"ddp{rank}", processes=Processes(rank, world, rank), opt="sgd")
        run.run()
        if rank == 0:
            torch.save(run.student.state_dict(), tmp_path / "ddp.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_match_one_process_on_the_same_global_batches(tmp_path):
    """SGD, not AdamW: Adam divides by the gradient's own scale, so a gradient that is zero up to rounding
    (the key bias's, which softmax ignores) becomes a full-size step of random sign, different in any two
    summation orders; SGD keeps rounding differences at their own size."""
    one = trainer("evit", tmp_path / "one", opt="sgd")
    one.run()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    workers = [context.Process(target=_train_in_process, args=(rank, 2, port, tmp_path)) for rank in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=600)
        assert worker.exitcode == 0
    ddp = torch.load(tmp_path / "ddp.pt")
    for name, value in one.student.state_dict().items():
        torch.testing.assert_close(ddp[name], value, rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# Recipes

def test_recipes_are_the_papers_over_the_common_one_and_canonical():
    idle, dyvit, evit = resolve("idle", {"epochs": 2}), resolve("dynamicvit", {"epochs": 2}), resolve("evit", {"epochs": 2})
    assert (idle["cut_loss"], idle["cut_weight"], idle["distill"], idle["distill_weight"]) == ("both", 20.0, "kl+feature", 5.0)
    assert (dyvit["lr"], dyvit["ratio_weight"], dyvit["backbone_lr_scale"], dyvit["predictor_only_fraction"]) == (
        1e-3, 2.0, 0.01, 5 / 30)
    assert evit["distill"] == "none" and idle["freeze"] == ("cls_token", "pos_embed")
    assert canonical("idle", {"epochs": 2, "cut_weight": "20"}) == canonical("idle", {"epochs": 2.0})  # spelled out
    assert dict(canonical("idle", {"epochs": 2, "cut_weight": 10}))["cut_weight"] == 10.0
    assert dict(canonical("idle", {"epochs": 2})) == resolve("idle", {"epochs": 2})  # the whole recipe: keys follow defaults
    for bad, message in (({"cut_loss": "all"}, "valid: both, intra, inter, none"), ({"lr": -1}, "lr=-1"),
                         ({"nosuch": 1}, "unknown finetune setting 'nosuch'"), ({"keep_warmup_epochs": 1}, "valid with: evit")):
        with pytest.raises(RecipeError, match=message):
            resolve("idle", dict(epochs=1, **bad))


def test_the_regime_names_every_setting_off_the_methods_defaults():
    assert regime_label("dynamicvit", ()) == "off-the-shelf"
    assert regime_label("dynamicvit", canonical("dynamicvit", {"epochs": 2})) == "finetuned 2 ep"
    changed = canonical("dynamicvit", {"epochs": 2, "ratio_weight": 50, "lr": "1e-2", "freeze": ""})
    assert regime_label("dynamicvit", changed) == "finetuned 2 ep, freeze=none, lr=0.01, ratio_weight=50"
    # As a record stores it (JSON: lists, whole numbers as ints), the same recipe gets the same label.
    stored = [[name, list(value) if isinstance(value, tuple) else value]
              for name, value in canonical("idle", {"epochs": 6})]
    assert regime_label("idle", stored) == "finetuned 6 ep"
    assert regime_label("no-longer-registered", stored) == "finetuned 6 ep"


@pytest.mark.parametrize("argv, named", [
    (["--finetune-opt", "lr=1e-4"], "--finetune-epochs"),
    (["--finetune-epochs", "0"], "'0'"),
    (["--finetune-epochs", "1", "--finetune-opt", "cut_loss=all"], "cut_loss='all'"),
    (["--finetune-epochs", "1", "--finetune-opt", "lr"], "NAME=VALUE"),
    (["--finetune-epochs", "1", "--train-dir", "/nowhere/train"], "/nowhere/train"),
])
def test_bad_finetune_flags_are_one_line_and_write_nothing(tmp_path, capsys, argv, named):
    out = tmp_path / "run"
    assert run_all.main(["--methods", "idle", "--metrics", "acc", "--limit", "8", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and not out.exists()


def test_finetune_then_accuracy_inline_in_dependency_order(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--methods", "evit", "--ratios", "0.7", "--metrics", "acc,flops", "--limit", "64", "--finetune-epochs",
            "0.1", "--finetune-opt", "train_limit=160", "--finetune-opt", "batch_size=16", "--out", str(out)]
    assert run_all.main(argv) == 0
    done, failed, _ = records.scan(out)
    assert not failed
    by_kind = {(r.spec.kind, r.spec.method): r for r in done.values()}
    tuned, evaluated = by_kind[("finetune", "evit")], by_kind[("acc", "evit")]
    assert evaluated.spec.finetune == tuned.spec.finetune
    assert {k: dict(tuned.spec.finetune)[k] for k in ("batch_size", "epochs", "train_limit")} == \
        dict(batch_size=16, epochs=0.1, train_limit=160)
    assert tuned.data["finished"] <= evaluated.data["started"]  # the dependency first
    assert evaluated.metrics["weights"] == "finetuned" and evaluated.metrics["regime"] == "finetuned 0.1 ep"
    assert (out / tuned.metrics["checkpoint"]).is_file() and tuned.metrics["curve"][-1]["top1"] is not None
    assert by_kind[("acc", "none")].metrics["regime"] == "off-the-shelf"  # the baseline is never finetuned
    assert ("flops", "evit") in by_kind and not by_kind[("flops", "evit")].spec.finetune  # FLOPs never wait
    # the label names the settings off EViT's defaults, so this run is never mistaken for the default recipe
    assert "evit [finetuned 0.1 ep, batch_size=16, train_limit=160]" in capsys.readouterr().out


def test_finetune_jobs_are_requeued_with_the_same_call():
    """On a timeout or preemption submitit calls `checkpoint`: the same call is requeued, and the job then
    resumes from its own last.pt (the resume itself is tested above)."""
    from submitit.helpers import DelayedSubmission

    from bench.dispatch import runner
    from bench.spec import JobSpec

    tuned = JobSpec("finetune", EMBEDDED, "evit", 0.7, finetune=(("epochs", 1.0),))
    function = runner.job_function(tuned)
    assert isinstance(function, runner.CheckpointableRun)
    again = function.checkpoint(tuned, "/run", False, {"git_commit": "abc"})
    assert isinstance(again, DelayedSubmission) and again.function is function
    assert again.args == (tuned, "/run", False, {"git_commit": "abc"})
    assert runner.job_function(JobSpec("acc", EMBEDDED)) is runner.run_submitted  # nothing to resume
