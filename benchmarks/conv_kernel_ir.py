"""The fused block's GEMM kernels compiled for a Hopper GPU (sm_90) without one, through
Triton's ahead-of-time path, and how each reduction is pipelined: its loops, the
asynchronous global-to-shared copies, the waits that drain them, the tensor-core (wgmma)
instructions, shared memory and registers. For kernel work where no GPU is at hand;
timings still need one.

    python benchmarks/conv_kernel_ir.py --loop flat   # or nested (the default kernel)
    python benchmarks/conv_kernel_ir.py --kernel weight-grad

Integer channel counts and pointers are marked divisible by 16, as Triton's JIT
specialises them at launch for CerberusNet's layers; without that it emits no
asynchronous copies at all.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastcifar.ops import conv_bn_relu


def compile_for_hopper(kernel, constants: dict, pointer_types: dict, sizes: tuple,
                       num_warps: int = 4, num_stages: int = 3):  # fmt: skip
    """`kernel` (a jit function, or the autotuner around one) compiled for sm_90 with
    `constants`; pointers are bf16 unless `pointer_types` says otherwise, `sizes` are the
    int32 arguments, and channel counts and pointers are marked divisible by 16."""
    fn = getattr(kernel, "fn", kernel)
    signature = {}
    for name in fn.arg_names:
        if name.endswith("_ptr"):
            signature[name] = "*" + pointer_types.get(name, "bf16")
        else:
            signature[name] = "i32" if name in sizes else "constexpr"
    divisible = [n for n in fn.arg_names if n.endswith("_ptr") or n in ("c_in", "c_out")]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    source = ASTSource(fn, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})  # fmt: skip


def compile_conv(flat: bool, block=(128, 64, 32)):
    """The convolution with the training forward's epilogue (bias, ReLU first, BatchNorm
    statistics), bf16 activations."""
    constants = dict(RELU_FIRST=True, AFFINE=False, RELU_LAST=False, STATS=True, HAS_BIAS=True,
                     UPCAST=False, PRECISION="tf32", ACC=tl.float32, FLAT_K=flat,
                     BLOCK_M=block[0], BLOCK_N=block[1], BLOCK_K=block[2])  # fmt: skip
    pointers = {"b_ptr": "fp32", "scale_ptr": "fp32", "shift_ptr": "fp32", "sum_ptr": "fp64",
                "sumsq_ptr": "fp64"}  # fmt: skip
    return compile_for_hopper(conv_bn_relu._conv3x3_kernel, constants, pointers,
                              ("batch", "height", "width", "c_in", "c_out"))  # fmt: skip


def compile_weight_grad(block=(128, 64, 64)):
    """The weight gradient: a reduction over pixels into fp32 (9, C_in, C_out)."""
    constants = dict(UPCAST=False, PRECISION="tf32", ACC=tl.float32, BLOCK_P=block[0],
                     BLOCK_CI=block[1], BLOCK_CO=block[2])  # fmt: skip
    sizes = ("batch", "height", "width", "c_in", "c_out", "pixels_per_split")
    kernel = conv_bn_relu._conv3x3_wgrad_kernel
    return compile_for_hopper(kernel, constants, {"dw_ptr": "fp32"}, sizes)


def pipeline_report(kernel) -> dict:
    """Counts read from the kernel's TritonGPU IR and PTX, and its registers per thread
    from the cubin (by the cuobjdump that Triton ships)."""
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    waits = [int(n) for n in re.findall(r"async_wait[^\n]*num = (\d+)", ttgir)]
    return {
        "loops": len(re.findall(r"\bscf\.for\b", ttgir)),
        "async copies": len(re.findall(r"async_copy_global_to_local", ttgir)),
        "drains (waits for every copy)": waits.count(0),
        "wgmma instructions": len(re.findall(r"\bwgmma\.mma_async", ptx)),
        "shared memory bytes": kernel.metadata.shared,
        "registers per thread": _registers(kernel.asm["cubin"]),
    }


def _registers(cubin: bytes) -> int:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout  # fmt: skip
    return int(re.search(r"REG:(\d+)", usage).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=["conv", "weight-grad"], default="conv")
    parser.add_argument("--loop", choices=["nested", "flat"], default="nested",
                        help="the convolution's reduction loop")  # fmt: skip
    args = parser.parse_args()
    kernel = compile_conv(args.loop == "flat") if args.kernel == "conv" else compile_weight_grad()
    for name, value in pipeline_report(kernel).items():
        print(f"{name:<32} {value}")


if __name__ == "__main__":
    main()
