"""The fused block's convolution kernel compiled for a Hopper GPU (sm_90) without one,
through Triton's ahead-of-time path, and how its reduction is pipelined: its loops, the
asynchronous global-to-shared copies, the waits that drain them and the tensor-core
(wgmma) instructions. For kernel work where no GPU is at hand; timings still need one.

    python benchmarks/conv_kernel_ir.py --loop flat   # or nested (the default kernel)

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

FP32_POINTERS = ("b_ptr", "scale_ptr", "shift_ptr")  # per-channel vectors
FP64_POINTERS = ("sum_ptr", "sumsq_ptr")  # BatchNorm's sums
SIZES = ("batch", "height", "width", "c_in", "c_out")


def compile_conv(flat: bool, block=(128, 64, 32), num_warps=4, num_stages=3):
    """The compiled kernel for bf16 activations, with the training forward's epilogue
    (bias, ReLU first, BatchNorm statistics)."""
    fn = conv_bn_relu._conv3x3_kernel.fn  # the JIT function under the autotuner
    signature = {}
    for name in fn.arg_names:
        if name.endswith("_ptr"):
            kind = "fp64" if name in FP64_POINTERS else "fp32" if name in FP32_POINTERS else "bf16"
            signature[name] = f"*{kind}"
        else:
            signature[name] = "i32" if name in SIZES else "constexpr"
    constants = dict(RELU_FIRST=True, AFFINE=False, RELU_LAST=False, STATS=True, HAS_BIAS=True,
                     UPCAST=False, PRECISION="tf32", ACC=tl.float32, FLAT_K=flat,
                     BLOCK_M=block[0], BLOCK_N=block[1], BLOCK_K=block[2])  # fmt: skip
    divisible = [n for n in fn.arg_names if n.endswith("_ptr")] + ["c_in", "c_out"]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    source = ASTSource(fn, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})  # fmt: skip


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
    parser.add_argument("--loop", choices=["nested", "flat"], default="nested")
    args = parser.parse_args()
    for name, value in pipeline_report(compile_conv(args.loop == "flat")).items():
        print(f"{name:<32} {value}")


if __name__ == "__main__":
    main()
