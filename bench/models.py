"""timm model creation, local checkpoints, and the embedded Fashion-MNIST ViT the project ships."""
from __future__ import annotations

import difflib
import os
import random
import socket
import sys
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import timm
import timm.data
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, load_state_dict, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

ASSETS = Path(__file__).resolve().parent / "assets"
from .spec import EMBEDDED_MODEL  # noqa: E402  (the name lives with the specs, which need no torch)
EMBEDDED_CHECKPOINT = ASSETS / f"{EMBEDDED_MODEL}.safetensors"

# The embedded default: DeiT-style (CLS token, qkv bias, token pooling) with 12 blocks so every
# method's default reduction layers apply unchanged; 28 px grey-scale input, patch 4 -> 7x7 = 49 patches.
EMBEDDED_ARCH = dict(
    img_size=28, patch_size=4, in_chans=1, num_classes=10,
    embed_dim=64, depth=12, num_heads=4, mlp_ratio=4.0, qkv_bias=True,
)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)

default_cfgs = generate_default_cfgs({
    f"{EMBEDDED_MODEL}.fmnist": dict(
        file=str(EMBEDDED_CHECKPOINT),
        num_classes=10, input_size=(1, 28, 28), pool_size=None,
        crop_pct=1.0, crop_mode="center", interpolation="bilinear",
        mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
        first_conv="patch_embed.proj", classifier="head",
        license="same as this project",
    ),
})


@register_model
def tokenbench_vit_fmnist(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """12-block, width-64 ViT for 28x28 Fashion-MNIST, trained by scripts/train_embedded.py."""
    return build_model_with_cfg(
        VisionTransformer, EMBEDDED_MODEL, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **dict(EMBEDDED_ARCH, **kwargs),
    )


# ---------------------------------------------------------------------------------------------
# Model creation with user weights. Every user-caused failure is one ModelError line.

class ModelError(ValueError):
    """A model name, checkpoint or pretrained-weights request that cannot be honoured."""


def seed_everything(seed: int) -> None:
    """One seed for model init, method modules (DynamicViT predictors) and forward-time sampling (random)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def create_model(name: str, checkpoint: str | os.PathLike | None = None, pretrained: bool = False,
                 **kwargs) -> nn.Module:
    """A timm model by name, with weights from a local `checkpoint` file or timm's `pretrained` source.

    `kwargs` go to `timm.create_model` (e.g. `img_size`, `num_classes`). With both `checkpoint` and
    `pretrained` the checkpoint wins: it is the more specific request.
    """
    check_model_name(name)
    if checkpoint is not None:
        state_dict = read_checkpoint(checkpoint)  # fail on a bad file before building a big model
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_weights(model, state_dict, checkpoint)
        return model
    if pretrained:
        return _create_pretrained(name, **kwargs)
    return timm.create_model(name, pretrained=False, **kwargs)


def wants_pretrained(name: str, checkpoint, pretrained: bool, random_weights: bool = False) -> bool:
    """Whether a job loads the pretrained weights: as asked, except that the embedded model loads its
    committed weights when no checkpoint is given, because it is meaningless untrained, unless the user
    asked for an untrained model (`--random-weights`): then the record's "random-init" is the truth."""
    embedded_default = checkpoint is None and _arch_name(name) == EMBEDDED_MODEL and not random_weights
    return bool(pretrained) or embedded_default


def weights_of(spec) -> str:
    """Where a job's weights come from, for its record: finetuned, checkpoint:<path>, pretrained,
    or random-init (only when the user opted in with --random-weights; pre-flight refuses it otherwise)."""
    if spec.finetune:
        return "finetuned"
    if spec.checkpoint is not None:
        return f"checkpoint:{spec.checkpoint}"
    wanted = wants_pretrained(spec.model, spec.checkpoint, spec.pretrained, spec.random_weights)
    return "pretrained" if wanted else "random-init"


def check_weights(spec) -> None:
    """Pre-flight of a job whose numbers depend on the weights (accuracy): trained weights are named,
    or the user asked for random ones. A 1000-class head at random init scores 0 % on any data, and
    that must never pass for a result."""
    if weights_of(spec) == "random-init" and not spec.random_weights:
        raise ModelError(f"model {spec.model!r} has no trained weights in this grid; valid: --checkpoint FILE, "
                         "--pretrained, the embedded model, or --random-weights to measure an untrained model "
                         "on purpose")
    if spec.checkpoint is not None:
        check_checkpoint(spec.model, spec.checkpoint)
    elif wants_pretrained(spec.model, spec.checkpoint, spec.pretrained, spec.random_weights):
        check_pretrained_available(spec.model)


def check_pretrained_available(name: str) -> None:
    """Pre-flight of pretrained weights: a local file that is there and fits, or a download that can
    happen (the hub answers) or has happened (the file is in the Hugging Face cache). Offline without
    a cached copy is one line now, not a failure per job later."""
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    local_file = getattr(cfg, "file", None) if cfg is not None else None
    if local_file:
        if not Path(local_file).is_file():
            how = " (make it with: python scripts/train_embedded.py)" if _arch_name(name) == EMBEDDED_MODEL else ""
            raise ModelError(f"pretrained weights of {name!r} are missing: {local_file}{how}; "
                             "valid: that file, or --checkpoint FILE")
        check_checkpoint(name, local_file)
        return
    if cfg is None or not (getattr(cfg, "hf_hub_id", None) or getattr(cfg, "url", None)):
        raise ModelError(f"timm has no pretrained weights for {name!r}; valid: --checkpoint FILE")
    if _in_hub_cache(cfg) or _hub_reachable(_hub_endpoint()):
        return
    raise ModelError(f"cannot get pretrained weights for {name!r}: the hub cannot be reached and they are "
                     "not cached; download them elsewhere and pass --checkpoint FILE")


def check_model_name(name: str) -> None:
    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=5, cutoff=0.6)
        hint = f"closest: {', '.join(close)}" if close else "see timm.list_models()"
        raise ModelError(f"unknown timm model {name!r}; {hint}")


def check_checkpoint(name: str, path) -> None:
    """Pre-flight: the file exists, reads, and fits the model's parameter names and shapes.

    The model is built on the meta device (no memory, no init); the file is read once per model and
    version of the file however many jobs name it."""
    check_model_name(name)
    try:
        stat = Path(path).stat()
        version = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        version = None  # read_checkpoint says what is wrong with it
    _check_checkpoint(name, str(Path(path).resolve()), version)


@lru_cache(maxsize=64)
def _check_checkpoint(name: str, path: str, version) -> None:
    state_dict = read_checkpoint(path)
    model = skeleton(name)
    _check_fits(model, _filter(model, state_dict, path), path)


@lru_cache(maxsize=None)
def skeleton(name: str) -> nn.Module:
    """The model's modules with meta tensors: its geometry at the cost of no memory and no init.
    Shared and cached: callers read it, never run or change it."""
    check_model_name(name)
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False)
    except Exception:  # a constructor that computes on its tensors: build it for real
        try:
            return timm.create_model(name, pretrained=False)
        except Exception as exc:
            raise ModelError(f"model {name!r} cannot be built ({type(exc).__name__}: {_first_line(exc)})") from None


def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """The state dict of a .pth/.pt (`{"model": sd}` DeiT format, `{"state_dict": sd}` or a bare state
    dict) or .safetensors file, through timm's loader. EMA weights are not preferred: the file's
    trained `model`/`state_dict` entry is what the user points at."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ModelError(f"checkpoint {str(path)!r} {what}; valid: a .pth, .pt or .safetensors file")
    try:
        state_dict = load_state_dict(str(path), use_ema=False)
    except Exception as exc:  # torch.load / safetensors raise many types for a damaged file
        raise ModelError(f"checkpoint {str(path)!r} cannot be read: {what_file(path, exc)}; "
                         "valid: a .pth, .pt or .safetensors file of a state dict") from None
    if not isinstance(state_dict, dict) or not state_dict or \
            not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ModelError(f"checkpoint {str(path)!r} holds no state dict; valid: a state dict, "
                         "or a dict with it under 'model' or 'state_dict'")
    return state_dict


def what_file(path: Path, exc: BaseException) -> str:
    """What a file that does not load as a checkpoint is, from its first bytes: the loaders' own
    messages ("101", "pop from empty list") describe their parsers, not the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
        size = path.stat().st_size
    except OSError as error:
        return f"{error.strerror or error}"
    if not head:
        return "it is empty (0 bytes)"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the weights (fetch them with: git lfs pull)"
    if head.startswith((b"PK\x03\x04", b"\x80")) or (size > 8 and head[8:9] == b"{"):  # zip, pickle, safetensors
        return f"it is a damaged or truncated checkpoint of {size} bytes ({_first_line(exc)})"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it is a {size}-byte binary file of no checkpoint format (starts {head[:8].hex(' ')})"
    if text.lstrip().lower().startswith(("<!doctype html", "<html")):
        return "it is an HTML page (a failed download?), not weights"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"it is a text file, not weights (starts {first[:40]!r})"


def load_weights(model: nn.Module, state_dict: dict, source, convert: bool = True) -> None:
    """Load a state dict through the model family's timm filter (pos-embed and patch resizing, foreign
    layouts), after checking that names and shapes fit, so a mismatch is one line that lists them.
    `convert=False` for our own checkpoints of the very same (patched) model: nothing to convert."""
    if convert:
        state_dict = _filter(model, state_dict, source)
    _check_fits(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True)


def _filter(model: nn.Module, state_dict: dict, source) -> dict:
    """timm's convention: a model family's module defines `checkpoint_filter_fn(state_dict, model)`,
    the same function its pretrained weights go through."""
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state_dict
    try:
        return filter_fn(state_dict, model)
    except Exception as exc:  # a layout the family's converter does not understand
        raise ModelError(f"checkpoint {str(source)!r} cannot be converted for {type(model).__name__} "
                         f"({type(exc).__name__}: {_first_line(exc)})") from None


def _check_fits(model: nn.Module, state_dict: dict, source) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    mismatched = [f"{k} {got[k]} vs model {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    problems = []
    if mismatched:
        problems.append(f"mismatched shapes: {_some(mismatched)}")
    if missing:
        problems.append(f"missing keys: {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_some(unexpected)}")
    if problems:
        raise ModelError(f"checkpoint {str(source)!r} does not fit {type(model).__name__} "
                         f"{getattr(model, 'pretrained_cfg', {}).get('architecture', '')}: " + "; ".join(problems))


def _some(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _first_line(exc: BaseException, limit: int = 160) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


def _arch_name(name: str) -> str:
    return str(name).split(".", 1)[0]


def _create_pretrained(name: str, **kwargs) -> nn.Module:
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    local_file = (kwargs.get("pretrained_cfg_overlay") or {}).get("file") or getattr(cfg, "file", None)
    if local_file and not Path(local_file).is_file():
        how = " (make it with: python scripts/train_embedded.py)" if _arch_name(name) == EMBEDDED_MODEL else ""
        raise ModelError(f"pretrained weights of {name!r} are missing: {local_file}{how}")
    offline = _hub_offline() if not local_file else nullcontext()
    try:
        with offline:
            return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:
        raise ModelError(f"cannot get pretrained weights for {name!r} ({type(exc).__name__}: {_first_line(exc)}); "
                         "offline? download them elsewhere and pass --checkpoint FILE") from None


def _hub_endpoint() -> str:
    import huggingface_hub.constants as hub

    return hub.ENDPOINT


def _in_hub_cache(cfg) -> bool:
    """Whether timm's pretrained file for `cfg` is already in the local Hugging Face cache."""
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        return False
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = repo.partition("@")
    for filename in (getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin",
                     "open_clip_pytorch_model.bin", "open_clip_model.safetensors"):
        if filename and isinstance(try_to_load_from_cache(repo, filename, revision=revision or None), str):
            return True
    return False


def _hub_offline():
    """Hugging Face offline mode (cached weights only) when the hub cannot be reached, so an offline
    machine fails in a second instead of after the hub client's retries (about a minute)."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE or _hub_reachable(hub.ENDPOINT):
        return nullcontext()
    return _patched(hub, "HF_HUB_OFFLINE", True)


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy can tell; let the hub client try
    url = urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _patched(obj, attr: str, value):
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


# ---------------------------------------------------------------------------------------------
# Where and how a model runs: input size, device, precision.

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model was built for. Read off the patch embedding, which follows an `img_size`
    override where the pretrained config's input_size would not."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
        height, width = patch_embed.img_size
        return int(patch_embed.proj.in_channels), int(height), int(width)
    return tuple(timm.data.resolve_data_config({}, model=model)["input_size"])


def autocast(device: str, dtype: str):
    """The precision context of a job: nothing for fp32, torch.autocast for bf16/fp16."""
    if dtype not in AUTOCAST_DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; valid: {', '.join(AUTOCAST_DTYPES)}")
    if AUTOCAST_DTYPES[dtype] is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[dtype])
