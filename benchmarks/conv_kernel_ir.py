"""The fused block's GEMM kernels compiled for a Hopper GPU (sm_90) without one, through
Triton's ahead-of-time path, and how each reduction is pipelined: its loops, the
asynchronous global-to-shared copies, the waits that drain them, the tensor-core (wgmma)
instructions, shared memory and registers. For kernel work where no GPU is at hand;
timings still need one.

    python benchmarks/conv_kernel_ir.py --loop flat   # or nested (the default kernel), or tma
    python benchmarks/conv_kernel_ir.py --kernel weight-grad
    python benchmarks/conv_kernel_ir.py --tiles --loop flat   # every candidate tile

Integer channel counts and pointers are marked divisible by 16, as Triton's JIT
specialises them at launch for CerberusNet's layers; without that it emits no
asynchronous copies at all.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from functools import partial
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastcifar.ops import fused_kernels


def compile_for_hopper(kernel, constants: dict, pointer_types: dict, sizes: tuple,
                       num_warps: int = 4, num_stages: int = 3):  # fmt: skip
    """`kernel` (a jit function, or the autotuner around one) compiled for sm_90 with
    `constants`; pointers are bf16 unless `pointer_types` says otherwise, tensor
    descriptors (`*_desc`) take their type from it, `sizes` are the int32 arguments, and
    channel counts and pointers are marked divisible by 16."""
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):  # inside autotuner, heuristics
        fn = fn.fn
    signature = {}
    for name in fn.arg_names:
        if name.endswith("_desc"):
            signature[name] = pointer_types[name]
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_types.get(name, "bf16")
        else:
            signature[name] = "i32" if name in sizes else "constexpr"
    divisible = [n for n in fn.arg_names if n.endswith("_ptr") or n in ("c_in", "c_out")]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    source = ASTSource(fn, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})  # fmt: skip


# the training forward's epilogue (bias, ReLU first, BatchNorm statistics)
EPILOGUE = dict(RELU_FIRST=True, AFFINE=False, RELU_LAST=False, STATS=True, HAS_BIAS=True,
                UPCAST=False, PRECISION="tf32", ACC=tl.float32)  # fmt: skip
EPILOGUE_POINTERS = {"b_ptr": "fp32", "scale_ptr": "fp32", "shift_ptr": "fp32",
                     "sum_ptr": "fp64", "sumsq_ptr": "fp64"}  # fmt: skip


def _descriptor_type(*box: int) -> str:
    """The signature type of a bf16 tensor descriptor with this box."""
    return f"tensordesc<bf16[{', '.join(map(str, box))}]>"


def compile_conv(loop: str, block=(128, 64, 32), num_warps: int = 4, tap_aligned: bool = True,
                 size: int = 32):  # fmt: skip
    """The convolution with the training forward's epilogue, bf16 activations, its
    reduction `loop` nested, flat or tma; `tap_aligned`: BLOCK_K divides the input
    channels; `size`: the image's (a compile-time constant of the TMA kernel)."""
    tile = dict(BLOCK_M=block[0], BLOCK_N=block[1], BLOCK_K=block[2])
    if loop == "tma":
        box = fused_kernels.image_box(block[0], size, size)
        descriptors = {"x_desc": _descriptor_type(*box, block[2]),
                       "w_desc": _descriptor_type(block[2], block[1])}  # fmt: skip
        return compile_for_hopper(fused_kernels.conv3x3_tma_kernel,
                                  {**EPILOGUE, **tile, "height": size, "width": size},
                                  {**EPILOGUE_POINTERS, **descriptors},
                                  ("batch", "c_in", "c_out"), num_warps)  # fmt: skip
    constants = {**EPILOGUE, **tile, "FLAT_K": loop == "flat", "TAP_ALIGNED": tap_aligned}
    return compile_for_hopper(fused_kernels.conv3x3_kernel, constants, EPILOGUE_POINTERS,
                              ("batch", "height", "width", "c_in", "c_out"), num_warps)  # fmt: skip


def compile_weight_grad(block=(128, 64, 64), num_warps: int = 4, size: int = 32,
                        loop: str = "nested"):  # fmt: skip
    """The weight gradient: a reduction over pixels into fp32 (9, C_in, C_out), for
    `size` x `size` images (a compile-time constant of the kernel); `loop` tma: its
    TMA-fed version."""
    constants = dict(height=size, width=size, UPCAST=False, PRECISION="tf32", ACC=tl.float32,
                     BLOCK_P=block[0], BLOCK_CI=block[1], BLOCK_CO=block[2])  # fmt: skip
    sizes = ("batch", "c_in", "c_out", "pixels_per_split")
    types = {"dw_ptr": "fp32"}
    kernel = fused_kernels.conv3x3_wgrad_kernel
    if loop == "tma":
        box = fused_kernels.image_box(block[0], size, size)
        types |= {"x_desc": _descriptor_type(*box, block[1]),
                  "dy_desc": _descriptor_type(block[0], block[2])}  # fmt: skip
        kernel = fused_kernels.conv3x3_wgrad_tma_kernel
    return compile_for_hopper(kernel, constants, types, sizes, num_warps)


def pipeline_report(kernel) -> dict:
    """Counts read from the kernel's TritonGPU IR and PTX, and from its machine code (SASS,
    disassembled by the cuobjdump that Triton ships): registers per thread, and the
    instructions a step of its longest loop issues, which the reduction's index arithmetic
    adds to beside the copies and the tensor-core work."""
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    waits = [int(n) for n in re.findall(r"async_wait[^\n]*num = (\d+)", ttgir)]
    dump = _cuobjdump(kernel, "-res-usage", "-sass")  # resource usage, then the code
    registers = re.search(r"REG:(\d+)", dump).group(1)
    return {
        "loops": len(re.findall(r"\bscf\.for\b", ttgir)),
        "async copies": len(re.findall(r"async_copy_global_to_local", ttgir)),
        "TMA copies": len(re.findall(r"async_tma_copy_global_to_local", ttgir)),
        # a reshape of loaded values (not of their shared-memory view) runs through registers
        "reshapes in registers": len(re.findall(r"\btt\.reshape\b", ttgir)),
        "drains (waits for every copy)": waits.count(0),
        "wgmma instructions": len(re.findall(r"\bwgmma\.mma_async", ptx)),
        "shared memory bytes": kernel.metadata.shared,
        "registers per thread": int(registers),
        "instructions a loop step": max(_loop_lengths(dump), default=0),
    }


def _cuobjdump(kernel, *flags: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([str(tool), *flags, f.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip


def _loop_lengths(sass: str) -> list[int]:
    """Instructions from each conditional backward branch's target to the branch (SASS
    instructions are 16 bytes apart, each line starting with its address). An
    unconditional one is not a loop's: it returns from code placed out of line (TMA's
    barrier wait spins there), into the middle of the loop."""
    lengths = []
    for here, target in re.findall(r"/\*([0-9a-f]+)\*/\s*@!?U?P\w*\s+BRA\s+(0x[0-9a-f]+)", sass):
        if int(target, 16) < int(here, 16):
            lengths.append((int(here, 16) - int(target, 16)) // 16 + 1)
    return lengths


def tile_table(kernel: str, loop: str) -> list[str]:
    """Every candidate tile the autotuner may pick on a GPU, as a Markdown table."""
    rows = ["| tile | warps | instructions a loop step | registers | shared memory |",
            "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    if kernel == "conv":
        tiles = fused_kernels.TMA_CONV_TILES if loop == "tma" else fused_kernels.CONV_TILES
        compile_tile = partial(compile_conv, loop)
    else:
        tiles = fused_kernels.WGRAD_TILES
        compile_tile = partial(compile_weight_grad, loop=loop)
    for *block, warps in tiles:
        r = pipeline_report(compile_tile(tuple(block), warps))
        rows.append(f"| {' x '.join(map(str, block))} | {warps} | {r['instructions a loop step']} "
                    f"| {r['registers per thread']} | {r['shared memory bytes'] // 1024} KiB |")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=["conv", "weight-grad"], default="conv")
    parser.add_argument("--loop", choices=["nested", "flat", "tma"], default="nested",
                        help="the convolution's reduction loop (tma: 32 x 32 images; for "
                             "the weight gradient, tma or its pointer loop)")  # fmt: skip
    parser.add_argument("--tiles", action="store_true",
                        help="a table of every candidate tile instead of one tile's report")  # fmt: skip
    args = parser.parse_args()
    if args.tiles:
        print("\n".join(tile_table(args.kernel, args.loop)))
        return
    if args.kernel == "conv":
        kernel = compile_conv(args.loop)
    else:
        kernel = compile_weight_grad(loop=args.loop)
    for name, value in pipeline_report(kernel).items():
        print(f"{name:<32} {value}")


if __name__ == "__main__":
    main()
