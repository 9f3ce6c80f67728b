"""The Triton kernels of the fused conv + BatchNorm + ReLU block (`conv_bn_relu` launches
them), and the tiles they are autotuned over on a GPU.

Layout: activations NHWC, weights as (9, C_in, C_out). The convolution is an implicit
GEMM whose epilogue adds the bias, applies a ReLU (first or last), the eval-mode affine,
and accumulates BatchNorm's per-channel sums; a light pass applies the normalisation;
BatchNorm's backward is a reduction pass and an elementwise pass; the weight gradient is
a pixel-reduction GEMM split over programs. Each GEMM also has a Hopper variant fed by
the tensor memory accelerator (TMA).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# FASTCIFAR_AUTOTUNE=0 keeps the first tile that fits instead of timing them all: the GPU
# test run, where tuning each of its many small shapes takes minutes
AUTOTUNE = os.environ.get("FASTCIFAR_AUTOTUNE", "1") != "0"


# ---------------------------------------------------------------- tile choices
# The two GEMM kernels are autotuned on a GPU over the tiles below, per layer shape (the
# first call of each shape times them all). The interpreter runs one small tile. Their
# atomically accumulated outputs are zeroed by each config's pre-hook, which Triton runs
# before every launch, timing runs included, so a tuning run leaves no sums behind.


def _zero(*names, when: str | None = None):
    """A pre-hook zeroing the named tensor arguments (only if the flag `when` is set)."""

    def hook(args):
        if when is None or args[when]:
            for name in names:
                args[name].zero_()

    return hook


def tile_configs(names, shapes, hook):
    """triton.Configs of (tile sizes..., num_warps) tuples."""
    return [triton.Config(dict(zip(names, shape[:-1], strict=True)), num_warps=shape[-1], num_stages=3,
                          pre_hook=hook) for shape in shapes]  # fmt: skip


# which channel count bounds each tile dimension
_TILE_CHANNELS = (
    ("BLOCK_N", "c_out"),
    ("BLOCK_K", "c_in"),
    ("BLOCK_CI", "c_in"),
    ("BLOCK_CO", "c_out"),
)


def prune_tiles(configs, named_args, **_):
    """Drop tiles far wider than the layer's channels (64 input channels need no 128 tile).
    The interpreter, which cannot time tiles, keeps one: the largest no wider than the layer."""

    def fits(block, channels):
        if INTERPRET:
            return block <= channels
        return block <= max(32, triton.next_power_of_2(channels))

    kept = [c for c in configs
            if all(fits(c.kwargs[b], named_args[ch]) for b, ch in _TILE_CHANNELS if b in c.kwargs)]  # fmt: skip
    if INTERPRET:
        return kept[-1:] or configs[:1]
    return (kept if AUTOTUNE else kept[:1]) or configs[:1]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps): pixels x output channels x input channels. The
# last, and the weight gradient's last, are large tiles for the compute-bound 128- and
# 256-channel layers, where these kernels lose most to cuDNN; compiled for sm_90 here
# (`benchmarks/conv_kernel_ir.py --tiles`) they take 165 and 141 registers a thread and
# 96 KiB and 192 KiB of shared memory, where 128 x 256 x 64 reaches the 255-register limit.
CONV_TILES = [(64, 64, 32, 4), (128, 64, 32, 4), (64, 128, 32, 4), (128, 128, 32, 8),
              (128, 64, 64, 4), (256, 64, 32, 8), (128, 128, 64, 8)]  # fmt: skip
# (BLOCK_P, BLOCK_CI, BLOCK_CO, num_warps): pixels summed x input x output channels
WGRAD_TILES = [(64, 64, 64, 4), (128, 64, 64, 4), (128, 64, 64, 8), (64, 128, 128, 8),
               (128, 32, 64, 4), (128, 128, 128, 8)]  # fmt: skip
# The TMA-fed convolution's tiles take 58 to 123 registers a thread where the pointer
# kernel's take 91 to 224 (Triton 3.6, sm_90), so it also tries larger ones, which issue
# about as many instructions a step for up to 8x the tensor-core work (94 to 108 a step,
# 123 to 186 registers, no spills; benchmarks/NOTES.md)
TMA_CONV_TILES = CONV_TILES + [(128, 128, 64, 4), (256, 64, 64, 8), (256, 128, 64, 8),
                               (128, 256, 64, 8)]  # fmt: skip
if INTERPRET:  # programs run one by one: few, large tiles (the larger from 64 channels)
    CONV_TILES = TMA_CONV_TILES = [(32, 32, 16, 1), (64, 64, 32, 1)]
    WGRAD_TILES = [(32, 32, 32, 1), (64, 64, 64, 1)]
# split-K parts hold whole pixel tiles of every candidate
WGRAD_PIXEL_STEP = max(shape[0] for shape in WGRAD_TILES)
CONV_KEY = ["batch", "height", "width", "c_in", "c_out", "STATS", "AFFINE"]
_CONV_STATS_ZERO = _zero("sum_ptr", "sumsq_ptr", when="STATS")


def _autotuned_conv(hook, key=CONV_KEY, tiles=CONV_TILES):
    """The convolution kernels' autotuner over `tiles`, `hook` before each launch."""
    return triton.autotune(configs=tile_configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), tiles, hook),
                           key=key, prune_configs_by={"early_config_prune": prune_tiles})  # fmt: skip


def _autotuned_wgrad(hook):
    """The weight-gradient kernels' autotuner over WGRAD_TILES, `hook` before each launch."""
    return triton.autotune(configs=tile_configs(("BLOCK_P", "BLOCK_CI", "BLOCK_CO"), WGRAD_TILES, hook),
                           key=["batch", "height", "width", "c_in", "c_out", "pixels_per_split"],
                           prune_configs_by={"early_config_prune": prune_tiles})  # fmt: skip


# ---------------------------------------------------------------- kernels


@_autotuned_conv(_CONV_STATS_ZERO, key=[*CONV_KEY, "FLAT_K"])
@triton.heuristics({"TAP_ALIGNED": lambda args: args["c_in"] % args["BLOCK_K"] == 0})
@triton.jit
def conv3x3_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, scale_ptr, shift_ptr, sum_ptr, sumsq_ptr,
    batch, height, width, c_in, c_out,
    RELU_FIRST: tl.constexpr, AFFINE: tl.constexpr, RELU_LAST: tl.constexpr,
    STATS: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, FLAT_K: tl.constexpr, TAP_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y[p, co] = epilogue(sum over taps and ci of x[p + tap, ci] * w[tap, ci, co]):
    an implicit GEMM over M = pixels, N = output channels, K = 9 x input channels. The
    reduction runs as nine taps of `c_in / BLOCK_K` steps, or with FLAT_K as one loop over
    all 9 x c_in, long enough for software pipelining; its steps span two taps only where
    BLOCK_K does not divide c_in (TAP_ALIGNED, set from the tile: CerberusNet's first
    layer's 3 channels), which costs a tap per column instead of one a step."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pixels = batch * height * width
    m_mask, n_mask = offs_m < pixels, offs_n < c_out
    oh = (offs_m // width) % height
    ow = offs_m % width
    # A tap's input pixel lies a fixed distance from the output pixel's own offset (NHWC,
    # stride 1, same size): one scalar a tap; only the borders' mask is per pixel.
    own = offs_m * c_in
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if FLAT_K and TAP_ALIGNED:  # one loop, each step inside one tap: the tap is a scalar
        taps = tl.zeros((BLOCK_M,), dtype=tl.int32)  # bit t: tap t lies inside the image
        for t in tl.static_range(9):
            inside = (m_mask & (oh + t // 3 - 1 >= 0) & (oh + t // 3 - 1 < height)
                      & (ow + t % 3 - 1 >= 0) & (ow + t % 3 - 1 < width))  # fmt: skip
            taps |= inside.to(tl.int32) << t
        a_ptrs = x_ptr + own[:, None] + tl.arange(0, BLOCK_K)[None, :]
        b_ptrs = w_ptr + tl.arange(0, BLOCK_K)[:, None] * c_out + offs_n[None, :]
        tap, ci0 = 0, 0  # of this step, carried from step to step (no division)
        for _ in range(0, 9 * c_in, BLOCK_K):
            shift = ((tap // 3 - 1) * width + tap % 3 - 1) * c_in + ci0
            a = tl.load(a_ptrs + shift, mask=((taps >> tap) & 1 != 0)[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
            b_ptrs += BLOCK_K * c_out
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, b, input_precision=PRECISION)
            ci0 += BLOCK_K
            tap = tl.where(ci0 == c_in, tap + 1, tap)
            ci0 = tl.where(ci0 == c_in, 0, ci0)
    elif FLAT_K:  # a step may span two taps (C_in no multiple of BLOCK_K): per column
        for k0 in range(0, 9 * c_in, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # (tap, input channel) of each step column
            k_mask = offs_k < 9 * c_in
            tap, ci = offs_k // c_in, offs_k % c_in
            dh, dw = (tap // 3 - 1)[None, :], (tap % 3 - 1)[None, :]
            inside = (m_mask[:, None] & k_mask[None, :] & (oh[:, None] + dh >= 0)
                      & (oh[:, None] + dh < height) & (ow[:, None] + dw >= 0)
                      & (ow[:, None] + dw < width))  # fmt: skip
            a = tl.load(x_ptr + own[:, None] + (dh * width + dw) * c_in + ci[None, :],
                        mask=inside, other=0.0)  # fmt: skip
            b = tl.load(w_ptr + offs_k[:, None] * c_out + offs_n[None, :],
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # fmt: skip
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, b, input_precision=PRECISION)
    else:
        for tap in tl.static_range(9):
            dh, dw = tap // 3 - 1, tap % 3 - 1
            inside = (m_mask & (oh + dh >= 0) & (oh + dh < height) & (ow + dw >= 0)
                      & (ow + dw < width))  # fmt: skip
            row = own + (dh * width + dw) * c_in
            for k0 in range(0, c_in, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < c_in
                a = tl.load(
                    x_ptr + row[:, None] + offs_k[None, :],
                    mask=inside[:, None] & k_mask[None, :],
                    other=0.0,
                )
                b = tl.load(w_ptr + (tap * c_in + offs_k[:, None]) * c_out + offs_n[None, :],
                            mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # fmt: skip
                if UPCAST:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc += tl.dot(a, b, input_precision=PRECISION)
    _conv_epilogue(acc, offs_m, offs_n, m_mask, n_mask, b_ptr, y_ptr, scale_ptr, shift_ptr,
                   sum_ptr, sumsq_ptr, c_out, RELU_FIRST, AFFINE, RELU_LAST, STATS, HAS_BIAS, ACC)  # fmt: skip


@triton.jit
def _conv_epilogue(
    acc, offs_m, offs_n, m_mask, n_mask, b_ptr, y_ptr, scale_ptr, shift_ptr, sum_ptr, sumsq_ptr,
    c_out, RELU_FIRST: tl.constexpr, AFFINE: tl.constexpr, RELU_LAST: tl.constexpr,
    STATS: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Bias, ReLU (first), the eval-mode affine, ReLU (last), the store, and the sums
    BatchNorm needs, of one (pixels x output channels) tile of the convolution."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(ACC)[None, :]
    if RELU_FIRST:
        acc = tl.maximum(acc, 0.0)
    if AFFINE:
        scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
        shift = tl.load(shift_ptr + offs_n, mask=n_mask, other=0.0)
        acc = acc * scale[None, :] + shift[None, :]
    if RELU_LAST:
        acc = tl.maximum(acc, 0.0)
    valid = m_mask[:, None] & n_mask[None, :]
    out = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_m[:, None] * c_out + offs_n[None, :], out, mask=valid)
    if STATS:  # of the values BatchNorm will see, as stored
        seen = tl.where(valid, out.to(ACC), 0.0)
        stat = sum_ptr.dtype.element_ty
        tl.atomic_add(sum_ptr + offs_n, tl.sum(seen, axis=0).to(stat), mask=n_mask)
        tl.atomic_add(sumsq_ptr + offs_n, tl.sum(seen * seen, axis=0).to(stat), mask=n_mask)


def image_box(block_m: int, height: int, width: int) -> tuple[int, int, int]:
    """(images, rows, columns) of a TMA box of `block_m` consecutive NHWC pixels: whole
    rows, and whole images once a tile holds more than one (sizes are powers of two)."""
    rows = min(height, block_m // width)
    return block_m // (rows * width), rows, width


def _tma_hook(zero, pixels: str, channels: str, second: tuple[str, str, str]):
    """A pre-hook: `zero`, then the boxes of this tile's descriptors (Triton's pattern for
    autotuned tiles over host-made tensor descriptors): `x_desc`'s, whole image rows of
    the tile's `pixels` by its `channels`, and the `second` (name, rows, columns)'s."""

    def hook(args):
        zero(args)
        box = image_box(args[pixels], args["height"], args["width"])
        args["x_desc"].block_shape = [*box, args[channels]]
        name, rows, columns = second
        args[name].block_shape = [args[rows], args[columns]]

    return hook


@_autotuned_conv(
    _tma_hook(_CONV_STATS_ZERO, "BLOCK_M", "BLOCK_K", ("w_desc", "BLOCK_K", "BLOCK_N")),
    tiles=TMA_CONV_TILES,
)
@triton.jit
def conv3x3_tma_kernel(
    x_desc, w_desc, b_ptr, y_ptr, scale_ptr, shift_ptr, sum_ptr, sumsq_ptr,
    batch, height: tl.constexpr, width: tl.constexpr, c_in, c_out,
    RELU_FIRST: tl.constexpr, AFFINE: tl.constexpr, RELU_LAST: tl.constexpr,
    STATS: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The same convolution and epilogue as `conv3x3_kernel`, its operands loaded by the
    tensor memory accelerator (Hopper's TMA): `x_desc` views the input as a 4-D (N, H, W,
    C_in) tensor, so a tap's tile is one box at the tap's offset, and the padding ring
    is the zeros TMA fills in for coordinates outside the image: no masks, no address
    arithmetic. A tile is whole image rows (image sizes powers of two, BLOCK_K dividing
    C_in); one loop over 9 x C_in, each step inside one tap. The product is computed
    transposed, (C_out x pixels) = w^T x^T, so that the box is the tensor cores' second
    operand, which Triton reshapes in shared memory (as the first operand it is loaded
    into registers and reshaped there every step); the epilogue transposes it back."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    first = pid_m * BLOCK_M  # the tile's first pixel: column 0 of a row
    image, row = first // (height * width), (first // width) % height
    offs_m = first + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC)
    tap, ci0 = 0, 0  # of this step, carried from step to step (no division)
    for k0 in range(0, 9 * c_in, BLOCK_K):
        a = x_desc.load([image, row + tap // 3 - 1, tap % 3 - 1, ci0]).reshape(BLOCK_M, BLOCK_K)
        b = w_desc.load([k0, pid_n * BLOCK_N])
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc_t += tl.dot(tl.trans(b), tl.trans(a), input_precision=PRECISION)
        ci0 += BLOCK_K
        tap = tl.where(ci0 == c_in, tap + 1, tap)
        ci0 = tl.where(ci0 == c_in, 0, ci0)
    acc = tl.trans(acc_t)
    _conv_epilogue(acc, offs_m, offs_n, offs_m < batch * height * width, offs_n < c_out, b_ptr,
                   y_ptr, scale_ptr, shift_ptr, sum_ptr, sumsq_ptr, c_out, RELU_FIRST, AFFINE,
                   RELU_LAST, STATS, HAS_BIAS, ACC)  # fmt: skip


@triton.jit
def affine_kernel(v_ptr, out_ptr, scale_ptr, shift_ptr, pixels, channels,
                   RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """out = v * scale[c] + shift[c], then ReLU when asked: BatchNorm's normalisation."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < channels
    mask = (offs_m < pixels)[:, None] & n_mask[None, :]
    idx = offs_m[:, None] * channels + offs_n[None, :]
    v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(scale_ptr.dtype.element_ty)
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    shift = tl.load(shift_ptr + offs_n, mask=n_mask, other=0.0)
    out = v * scale[None, :] + shift[None, :]
    if RELU:
        out = tl.maximum(out, 0.0)
    tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_backward_tile(
    dout_ptr, v_ptr, mean_ptr, rstd_ptr, scale_ptr, shift_ptr, pixels, channels,
    RELU_LAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (pixels x channels) tile of what both BatchNorm backward passes read: dz, the
    gradient at z = BN(v) (through the trailing ReLU for conv -> BN -> ReLU), v and xhat,
    in the statistics' dtype (fp32, or fp64 for fp64 inputs)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < channels
    mask = (offs_m < pixels)[:, None] & n_mask[None, :]
    idx = offs_m[:, None] * channels + offs_n[None, :]
    stat = mean_ptr.dtype.element_ty
    dz = tl.load(dout_ptr + idx, mask=mask, other=0.0).to(stat)
    v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(stat)
    mean = tl.load(mean_ptr + offs_n, mask=n_mask, other=0.0)
    rstd = tl.load(rstd_ptr + offs_n, mask=n_mask, other=0.0)
    if RELU_LAST:
        scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
        shift = tl.load(shift_ptr + offs_n, mask=n_mask, other=0.0)
        dz = tl.where(v * scale[None, :] + shift[None, :] > 0, dz, 0.0)
    xhat = (v - mean[None, :]) * rstd[None, :]
    return offs_n, n_mask, mask, idx, dz, v, xhat, rstd


@triton.jit
def bn_backward_reduce_kernel(
    dout_ptr, v_ptr, mean_ptr, rstd_ptr, scale_ptr, shift_ptr, dsum_ptr, dxhat_sum_ptr,
    pixels, channels, RELU_LAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Per channel: sum of dz and of dz * xhat."""
    offs_n, n_mask, mask, _, dz, _, xhat, _ = _bn_backward_tile(
        dout_ptr, v_ptr, mean_ptr, rstd_ptr, scale_ptr, shift_ptr, pixels, channels,
        RELU_LAST, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    tl.atomic_add(dsum_ptr + offs_n, tl.sum(dz, axis=0), mask=n_mask)
    tl.atomic_add(
        dxhat_sum_ptr + offs_n, tl.sum(tl.where(mask, dz * xhat, 0.0), axis=0), mask=n_mask
    )


@triton.jit
def bn_backward_apply_kernel(
    dout_ptr, v_ptr, dconv_ptr, mean_ptr, rstd_ptr, gamma_ptr, scale_ptr, shift_ptr,
    dsum_ptr, dxhat_sum_ptr, dbias_ptr, pixels, channels,
    RELU_FIRST: tl.constexpr, RELU_LAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The gradient at the convolution's output: BatchNorm's backward, with the ReLU's mask
    on the side it sits. Its per-channel sum, the bias gradient, is added up on the way."""
    offs_n, n_mask, mask, idx, dz, v, xhat, rstd = _bn_backward_tile(
        dout_ptr, v_ptr, mean_ptr, rstd_ptr, scale_ptr, shift_ptr, pixels, channels,
        RELU_LAST, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    gamma = tl.load(gamma_ptr + offs_n, mask=n_mask, other=0.0)
    dsum = tl.load(dsum_ptr + offs_n, mask=n_mask, other=0.0)
    dxhat_sum = tl.load(dxhat_sum_ptr + offs_n, mask=n_mask, other=0.0)
    dv = (gamma * rstd)[None, :] * (
        dz - (dsum / pixels)[None, :] - xhat * (dxhat_sum / pixels)[None, :]
    )
    if RELU_FIRST:  # v is relu(conv): its gradient passes where v > 0
        dv = tl.where(v > 0, dv, 0.0)
    stored = dv.to(dconv_ptr.dtype.element_ty)
    tl.store(dconv_ptr + idx, stored, mask=mask)
    seen = tl.where(mask, stored.to(dv.dtype), 0.0)  # the bias gradient of what is stored
    tl.atomic_add(dbias_ptr + offs_n, tl.sum(seen, axis=0), mask=n_mask)


@_autotuned_wgrad(_zero("dw_ptr"))
@triton.jit
def conv3x3_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr, batch, height: tl.constexpr, width: tl.constexpr, c_in, c_out,
    pixels_per_split, UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
):  # fmt: skip
    """dw[tap, ci, co] += sum over this program's pixels p of x[p + tap, ci] * dy[p, co].
    The pixel sum is split across programs (split-K): with 64 channels there are only nine
    (ci, co, tap) tiles, far too few to fill a GPU; each split adds its part atomically.
    The image size is a compile-time constant (the autotuner keys on it anyway), so each
    step finds its pixels' rows and columns by shifts (CerberusNet's sizes are powers of
    two) instead of divisions."""
    pid_ci, pid_co, pid_z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tap, split = pid_z % 9, pid_z // 9
    dh, dw = tap // 3 - 1, tap % 3 - 1
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    ci_mask, co_mask = offs_ci < c_in, offs_co < c_out
    pixels = batch * height * width
    first = split * pixels_per_split
    last = tl.minimum(first + pixels_per_split, pixels)
    acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=ACC)
    rows = first + tl.arange(0, BLOCK_P)  # the first step's pixels
    a_ptrs = x_ptr + ((rows + dh * width + dw) * c_in)[:, None] + offs_ci[None, :]
    g_ptrs = dy_ptr + rows[:, None] * c_out + offs_co[None, :]
    for p0 in range(first, last, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_mask = offs_p < last
        ih = (offs_p // width) % height + dh
        iw = offs_p % width + dw
        inside = p_mask & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
        a = tl.load(a_ptrs, mask=inside[:, None] & ci_mask[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=p_mask[:, None] & co_mask[None, :], other=0.0)
        a_ptrs += BLOCK_P * c_in
        g_ptrs += BLOCK_P * c_out
        if UPCAST:
            a, g = a.to(tl.float32), g.to(tl.float32)
        acc += tl.dot(tl.trans(a), g, input_precision=PRECISION)
    out = dw_ptr + (tap * c_in + offs_ci[:, None]) * c_out + offs_co[None, :]
    tl.atomic_add(out, acc, mask=ci_mask[:, None] & co_mask[None, :])


@_autotuned_wgrad(
    _tma_hook(_zero("dw_ptr"), "BLOCK_P", "BLOCK_CI", ("dy_desc", "BLOCK_P", "BLOCK_CO"))
)
@triton.jit
def conv3x3_wgrad_tma_kernel(
    x_desc, dy_desc, dw_ptr, batch, height: tl.constexpr, width: tl.constexpr, c_in, c_out,
    pixels_per_split, UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
):  # fmt: skip
    """`conv3x3_wgrad_kernel` with TMA loads, as `conv3x3_tma_kernel`: a step's input
    tile is one box of whole image rows at the tap's offset, its outside TMA's zeros, and
    its gradient tile a box of the (pixels, C_out) matrix. Computed transposed, dw^T =
    dy^T x, so that the reshaped box is the tensor cores' second operand (reshaped in
    shared memory); a split's pixels are whole tiles (WGRAD_PIXEL_STEP), so no step
    reaches into the next split's."""
    pid_ci, pid_co, pid_z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tap, split = pid_z % 9, pid_z // 9
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    first = split * pixels_per_split
    last = tl.minimum(first + pixels_per_split, batch * height * width)
    acc_t = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=ACC)
    for p0 in range(first, last, BLOCK_P):
        image, row = p0 // (height * width), (p0 // width) % height
        a = x_desc.load([image, row + tap // 3 - 1, tap % 3 - 1, pid_ci * BLOCK_CI])
        a = a.reshape(BLOCK_P, BLOCK_CI)
        g = dy_desc.load([p0, pid_co * BLOCK_CO])
        if UPCAST:
            a, g = a.to(tl.float32), g.to(tl.float32)
        acc_t += tl.dot(tl.trans(g), a, input_precision=PRECISION)
    out = dw_ptr + (tap * c_in + offs_ci[None, :]) * c_out + offs_co[:, None]
    tl.atomic_add(out, acc_t, mask=(offs_ci < c_in)[None, :] & (offs_co < c_out)[:, None])
