"""The pipelines that benchmarks and `fastcifar profile` compare, by name: the tutorial
baseline, fastcifar's default for the device, and the baseline with one optimisation
switched on. Names and config values only (no torch), so the command line can offer
them without importing the benchmark machinery."""

# The baseline, fastcifar's default, and the baseline with each optimisation alone.
VARIANTS = ("baseline", "default", "amp", "channels_last", "compile", "tensor_loader",
            "native_loader", "dali_loader", "fused", "fused_optimizer")  # fmt: skip
# The config values each optimisation switches on over the baseline's.
ABLATIONS = {
    "amp": {"amp": "bf16"},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "tensor_loader": {"loader": "tensor", "native": "off"},
    "native_loader": {"loader": "tensor", "native": "on"},
    "dali_loader": {"loader": "dali"},
    "fused": {"fused": True},
    "fused_optimizer": {"fused_optimizer": True},
}
# Variants that read batches through fastcifar's loaders (`build.make_loader`); the
# others read them through the tutorial's DataLoader.
OWN_LOADER = ("default", "tensor_loader", "native_loader", "dali_loader")
