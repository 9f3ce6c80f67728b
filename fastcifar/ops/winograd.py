"""A 3x3 convolution (stride 1, padding 1) as Winograd F(2x2, 3x3) on the CPU, for
channels-last activations: `fastcifar._C`'s `winograd_conv3x3`, forward and the input's
gradient, in bf16 on a CPU with AVX512-BF16 (kernels/winograd_cpu.cpp) or in fp32 on one
with AVX2 and FMA (kernels/winograd_fp32_cpu.cpp).

Each 2 x 2 block of output pixels is A^T [(G w G^T) * (B^T d B)] A, with d the 4 x 4
input patch around it: per block and channel pair, 16 multiplications where the direct
convolution needs 36. The 16 elementwise products, summed over input channels, are 16
matrix products of (tiles x C_in) by (C_in x C_out). The input's gradient is the same
convolution of the output's gradient with the weights turned 180 degrees and transposed,
F(2x2, 3x3)'s or with `input_grad_tile=4` F(4x4, 3x3)'s (the op takes 36 weight tiles).
The weight's gradient is oneDNN's, or with `winograd_weight_grad` Winograd's too: the
weights' tiles' gradient is the sum over blocks of (B^T d B) * (A g A^T), g the output's
gradient at the block, 16 matrix products of (C_in x tiles) by (tiles x C_out), and the
weights' is G^T of it G; the same op sums the output's gradient over pixels for the
bias's. `reference_conv` and `reference_weight_grad` are the same arithmetic in plain
torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcifar.ops import native

native.load()  # registers the op (where the extension loads)

_BT = ((1.0, 0.0, -1.0, 0.0), (0.0, 1.0, 1.0, 0.0), (0.0, -1.0, 1.0, 0.0), (0.0, 1.0, 0.0, -1.0))
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_AT = ((1.0, 1.0, 1.0, 0.0), (0.0, 1.0, -1.0, -1.0))
# F(4x4, 3x3)'s (Lavin and Gray's, points 0, 1, -1, 2, -2), for the fp32 forward and input
# gradient with `tile=4` and the weight gradient with `weight_grad_tile=4`
_BT4 = ((4.0, 0.0, -5.0, 0.0, 1.0, 0.0), (0.0, -4.0, -4.0, 1.0, 1.0, 0.0),
        (0.0, 4.0, -4.0, -1.0, 1.0, 0.0), (0.0, -2.0, -1.0, 2.0, 1.0, 0.0),
        (0.0, 2.0, -1.0, -2.0, 1.0, 0.0), (0.0, 4.0, 0.0, -5.0, 0.0, 1.0))  # fmt: skip
_G4 = ((1 / 4, 0.0, 0.0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
       (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0.0, 0.0, 1.0))  # fmt: skip
_AT4 = ((1.0, 1.0, 1.0, 1.0, 1.0, 0.0), (0.0, 1.0, -1.0, 2.0, -2.0, 0.0),
        (0.0, 1.0, 1.0, 4.0, 4.0, 0.0), (0.0, 1.0, -1.0, 8.0, -8.0, 1.0))  # fmt: skip


def _matrix(rows, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32, device=like.device)


def weight_tiles(weight: torch.Tensor, dtype: torch.dtype, tile: int = 2) -> torch.Tensor:
    """G w G^T of each (C_out, C_in) 3 x 3 kernel, as ((tile + 2)^2, C_in, C_out) in `dtype`:
    `packed_weight_tiles`' fp32 values, rounded as it rounds them for bf16."""
    return packed_weight_tiles(weight, torch.float32, tile).to(dtype)


def packed_weight_tiles(weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                        tile: int = 2) -> torch.Tensor:  # fmt: skip
    """`weight_tiles` as the native op takes them for activations of `dtype`: bf16 with
    pairs of input channels together, (16, C_in / 2, C_out, 2), or fp32 (16, C_in, C_out),
    or with `tile=4` F(4x4, 3x3)'s 36 in place of 16. One (16 or 36 x 9) product,
    kron(G, G) with each kernel's nine taps, in place of a batch of tiny ones."""
    c_out, c_in = weight.shape[:2]
    g = _matrix(_G if tile == 2 else _G4, weight)
    pair = 2 if dtype == torch.bfloat16 else 1
    taps = weight.float().reshape(c_out, c_in // pair, pair, 9).permute(1, 0, 2, 3).reshape(-1, 9)
    with torch.autocast("cpu", enabled=False):  # the product in fp32, then rounded
        tiles = (torch.kron(g, g) @ taps.T).to(dtype)
    if pair == 2:
        return tiles.reshape(len(tiles), c_in // 2, c_out, 2)
    return tiles.reshape(len(tiles), c_in, c_out)


class _WinogradConv(torch.autograd.Function):
    """Forward and the input's gradient through the native op (each with its own tile);
    the weight's gradient oneDNN's, or with `winograd_grad` the native Winograd one."""

    @staticmethod
    def forward(ctx, x, weight, bias, winograd_grad, grad_tile, tile, input_grad_tile):
        x = x.contiguous(memory_format=torch.channels_last)
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.winograd_grad, ctx.grad_tile = bias is not None, winograd_grad, grad_tile
        ctx.input_grad_tile = input_grad_tile
        tiles = packed_weight_tiles(weight, x.dtype, tile)
        return torch.ops.fastcifar.winograd_conv3x3(x, tiles, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last).to(x.dtype)
        grad_x = grad_w = grad_b = pixel_sums = None
        if ctx.needs_input_grad[0]:
            turned = weight.flip(2, 3).transpose(0, 1)
            tiles = packed_weight_tiles(turned, x.dtype, ctx.input_grad_tile)
            grad_x = torch.ops.fastcifar.winograd_conv3x3(grad, tiles, None)
        if ctx.needs_input_grad[1] and ctx.winograd_grad:
            grad_w, pixel_sums = weight_grad(grad, x, tile=ctx.grad_tile)
            grad_w = grad_w.to(weight.dtype)
        elif ctx.needs_input_grad[1]:
            _, grad_w, _ = torch.ops.aten.convolution_backward(
                grad, x, weight.to(x.dtype), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                [False, True, False],
            )  # fmt: skip
            grad_w = grad_w.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3), dtype=torch.float32) if pixel_sums is None else pixel_sums
        return grad_x, grad_w, grad_b, None, None, None, None


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     winograd_weight_grad: bool = False, weight_grad_tile: int = 2,
                     tile: int = 2, input_grad_tile: int | None = None) -> torch.Tensor:  # fmt: skip
    """`F.conv2d(x, weight, bias, padding=1)` for 3x3 kernels through Winograd F(2x2, 3x3),
    or with `tile=4` F(4x4, 3x3) (height and width in multiples of 4; bf16: channels in
    multiples of 16), forward and input gradient, or the input gradient alone with
    `input_grad_tile=4` (unset: `tile`); x channels-last on the CPU with an even height
    and width, bf16 (the weights' tiles are rounded to bf16, the bias added in fp32) or
    fp32 (channels in multiples of 8). With `winograd_weight_grad` the weight's gradient is
    Winograd's too (bf16: channels in multiples of 16), as F(2x2, 3x3) or with
    `weight_grad_tile=4` F(4x4, 3x3) (height and width in multiples of 4)."""
    input_grad_tile = tile if input_grad_tile is None else input_grad_tile
    return _WinogradConv.apply(
        x, weight, bias, winograd_weight_grad, weight_grad_tile, tile, input_grad_tile
    )


def weight_grad(
    grad: torch.Tensor, x: torch.Tensor, tile: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3x3 weights' gradient (C_out, C_in, 3, 3), fp32, of the convolution of `x` whose
    output's gradient is `grad` (both bf16 or both fp32, channels-last): G^T [the native
    op's sum over blocks of (B^T d B) * (A g A^T)] G, blocks of 2 x 2 output pixels or
    with `tile=4` of 4 x 4; and the bias's, `grad`'s sum over pixels (C_out),
    fp32, which the op adds up as it reads `grad` (torch's sum of a bf16 channels-last
    tensor to fp32 casts it whole first, 3% of a CerberusNet step)."""
    tiles, pixel_sums = torch.ops.fastcifar.winograd_conv3x3_weight_grad(grad, x, tile)
    return _weights_from_tiles(tiles), pixel_sums


def _weights_from_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """G^T t G of each (C_in, C_out) pair's tile t of `tiles` (16 or 36, C_in, C_out): 4 x 4
    for F(2x2, 3x3), 6 x 6 for F(4x4, 3x3); as (C_out, C_in, 3, 3): one (9 x 16 or 36)
    product, kron(G, G)^T with every pair's tile, in place of an einsum that copies the
    tiles about first."""
    g = _matrix(_G if tiles.shape[0] == 16 else _G4, tiles)
    c_in, c_out = tiles.shape[1:]
    with torch.autocast("cpu", enabled=False):
        taps = torch.kron(g, g).T @ tiles.float().reshape(len(tiles), -1)  # (9, C_in * C_out)
    return taps.view(3, 3, c_in, c_out).permute(3, 2, 0, 1)


def reference_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   operands: torch.dtype = torch.float32, tile: int = 2) -> torch.Tensor:  # fmt: skip
    """The same arithmetic in plain torch ops, in fp32, with the transformed input and
    weight tiles rounded to `operands` first (bf16: as the native op rounds them), for
    F(2x2, 3x3) or with `tile=4` F(4x4, 3x3): the native op's reference."""
    n, _, h, w = x.shape
    at = _matrix(_AT if tile == 2 else _AT4, x)
    u = weight_tiles(weight, operands, tile).float()
    m = torch.bmm(_input_tiles(x, tile).to(operands).float(), u)
    m = m.reshape(tile + 2, tile + 2, n, h // tile, w // tile, -1).permute(2, 5, 3, 4, 0, 1)
    y = (at @ m @ at.T).permute(0, 1, 2, 4, 3, 5).reshape(n, -1, h, w)
    return y if bias is None else y + bias.float().view(1, -1, 1, 1)


def reference_weight_grad(grad: torch.Tensor, x: torch.Tensor, tile: int = 2) -> torch.Tensor:
    """`weight_grad`'s arithmetic in plain torch ops, in fp32, the transformed input and
    gradient rounded to bf16 as the native op rounds them: its reference."""
    a = _matrix(_AT if tile == 2 else _AT4, x).T
    planes = (tile + 2) ** 2
    blocks = grad.float().unfold(2, tile, tile).unfold(3, tile, tile)  # N,C_out,th,tw,t,t
    m = (a @ blocks @ a.T).permute(4, 5, 0, 2, 3, 1).reshape(planes, -1, grad.shape[1])
    v = _input_tiles(x, tile).to(torch.bfloat16).float()
    return _weights_from_tiles(torch.bmm(v.transpose(1, 2), m.to(torch.bfloat16).float()))


def _input_tiles(x: torch.Tensor, tile: int = 2) -> torch.Tensor:
    """B^T d B of every (tile + 2)-square patch d around a tile x tile block of `x`'s
    pixels (zero-padded), in fp32, as ((tile + 2)^2, blocks, C)."""
    bt = _matrix(_BT if tile == 2 else _BT4, x)
    size = tile + 2
    patches = F.pad(x.float(), (1, 1, 1, 1)).unfold(2, size, tile).unfold(3, size, tile)
    return (bt @ patches @ bt.T).permute(4, 5, 0, 2, 3, 1).reshape(size**2, -1, x.shape[1])
