"""Small stock timm Swin Transformers with random weights for the Swin method tests (no downloads), and a
per-window reference of the stock block written here from the Swin paper (not from timm or methods/swin.py).

SMALL: 64 px, patch 2 -> a 32x32 stem grid; stages of 32x32, 16x16, 8x8, 4x4 tokens in 4x4 windows, so
stage 3 (index 2, flat blocks 2-5) has 4 windows of M = 16 tokens and alternates W-MSA and shifted SW-MSA
(shift 2), as Swin-T's stage 3 (4 windows of 49) does."""
import math

import timm
import torch
import torch.nn.functional as F

SMALL = dict(img_size=64, patch_size=2, embed_dim=16, depths=(1, 1, 4, 1), num_heads=(1, 1, 2, 2),
             window_size=4, num_classes=10)
IMG = 64
SWIN_T = "swin_tiny_patch4_window7_224"


def swin(seed: int = 0, dtype=torch.float64, name: str = SWIN_T, **kwargs):
    """A stock Swin with weights that make attention peaked (timm's init keeps it near-uniform). Built on
    the CPU, not the meta device: the relative position index and shift masks are computed buffers."""
    torch.manual_seed(seed)
    kwargs = dict(SMALL if name == SWIN_T and not kwargs else {}, **kwargs)
    model = timm.create_model(name, pretrained=False, **dict(dict(drop_path_rate=0.0), **kwargs))  # training == eval
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim >= 2 and "relative_position_bias_table" not in pname:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            elif "norm" in pname and pname.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model.to(dtype).eval()


def images(batch: int, seed: int = 0, dtype=torch.float64, size: int = IMG) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------------------------
# The stock block, window by window, from the paper: cyclic shift by -s, windows of wh x ww, relative
# position bias B[dy + wh - 1, dx + ww - 1], and in a shifted block a -100 mask between tokens that the
# shift brought together from different regions of the map.


def windows_of(H: int, W: int, window, shift) -> list[list[int]]:
    """Raster positions (y * W + x in the unshifted map) of the tokens of every window, window order
    row-major over the shifted map, tokens row-major inside a window."""
    wh, ww = window
    sh, sw = shift
    out = []
    for wy in range(H // wh):
        for wx in range(W // ww):
            tokens = []
            for i in range(wh):
                for j in range(ww):
                    y, x = (wy * wh + i + sh) % H, (wx * ww + j + sw) % W  # shifted (y', x') holds (y' + s)
                    tokens.append(y * W + x)
            out.append(tokens)
    return out


def region(p: int, size: int, window: int, shift: int) -> int:
    """Region of shifted coordinate p: [0, size - window), [size - window, size - shift), [size - shift, size)."""
    if shift == 0:
        return 0
    return 0 if p < size - window else (1 if p < size - shift else 2)


def pair_bias(block, H: int, W: int, window_tokens: list[int], rows: list[int], cols: list[int]) -> torch.Tensor:
    """(heads, len(rows), len(cols)): relative position bias and shift mask between window slots."""
    wh, ww = block.window_size
    sh, sw = block.shift_size
    table = block.attn.relative_position_bias_table  # ((2wh-1)(2ww-1), heads)
    out = torch.zeros(table.shape[1], len(rows), len(cols), dtype=table.dtype)
    for a, r in enumerate(rows):
        for b, c in enumerate(cols):
            (ry, rx), (cy, cx) = divmod(r, ww), divmod(c, ww)
            out[:, a, b] = table[(ry - cy + wh - 1) * (2 * ww - 1) + (rx - cx + ww - 1)]
            if any(block.shift_size):
                first = window_tokens[0]  # the window's corner in the shifted map, from its first token
                y0, x0 = ((first // W) - sh) % H, ((first % W) - sw) % W
                ra = (region(y0 + ry, H, wh, sh), region(x0 + rx, W, ww, sw))
                rb = (region(y0 + cy, H, wh, sh), region(x0 + cx, W, ww, sw))
                if ra != rb:
                    out[:, a, b] += -100.0
    return out


def attention(block, normed: torch.Tensor, rows: list[int], cols: list[int], bias: torch.Tensor) -> torch.Tensor:
    """(len(rows), C): softmax(q_rows k_cols^T / sqrt(d) + bias) v_cols, projected; normed is (M, C)."""
    attn = block.attn
    heads = attn.num_heads
    qkv = F.linear(normed, attn.qkv.weight, attn.qkv.bias).reshape(normed.shape[0], 3, heads, -1)
    q, k, v = qkv[rows, 0], qkv[cols, 1], qkv[cols, 2]  # (n, heads, d)
    d = q.shape[-1]
    weights = (torch.einsum("ihd,jhd->hij", q, k) * d ** -0.5 + bias).softmax(-1)
    mixed = torch.einsum("hij,jhd->ihd", weights, v).reshape(len(rows), -1)
    return F.linear(mixed, attn.proj.weight, attn.proj.bias)


def attention_residual(block, x: torch.Tensor) -> torch.Tensor:
    """One image (H, W, C) -> (H * W, C): x + the block's window attention, window by window."""
    H, W, C = x.shape
    flat = x.reshape(H * W, C)
    out = flat.clone()
    for tokens in windows_of(H, W, block.window_size, block.shift_size):
        slots = list(range(len(tokens)))
        normed = block.norm1(flat[tokens])
        out[tokens] = flat[tokens] + attention(block, normed, slots, slots, pair_bias(block, H, W, tokens, slots, slots))
    return out


def stock_block(block, x: torch.Tensor) -> torch.Tensor:
    """One image (H, W, C) through the stock block, window by window."""
    out = attention_residual(block, x)
    out = out + block.mlp(block.norm2(out))
    return out.reshape(x.shape)
