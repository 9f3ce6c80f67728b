"""The one training configuration: a frozen dataclass whose fields map 1:1 to the
`fastcifar train` flags, saved in every run directory and checkpoint.

Values are resolved in this order, later winning: field defaults, the arch's recipe for
the device (`fastcifar.recipes`), a `--config FILE` (TOML, field names as keys), and
flags given on the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fastcifar.errors import UserError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine", "onecycle", "plateau")
AMP_MODES = ("none", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
LOADERS = ("tensor", "dali")
SWITCHES = ("auto", "on", "off")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "cerberus"  # network to train (`fastcifar list` names them all)
    data: str | None = None  # CIFAR-10 source; unset: $FASTCIFAR_DATA, then the cache
    download: bool = False  # fetch the official tarball: to --data when it is missing, else cached
    out: str | None = None  # run directory; unset: runs/<arch>-<timestamp>
    epochs: int = 20  # epoch cap
    batch_size: int = 128  # images per training step
    eval_batch_size: int = 1000  # images per evaluation step
    lr: float = 0.05  # peak learning rate
    optimizer: str = "sgd"  # sgd | adam | adamw
    momentum: float = 0.9  # SGD momentum (Adam: beta1)
    fused_optimizer: bool = False  # torch's fused optimiser step; off: torch's default
    nesterov: bool = True  # Nesterov momentum for SGD
    weight_decay: float = 5e-4  # L2 penalty (decoupled for adamw)
    schedule: str = "onecycle"  # constant | step | cosine | onecycle | plateau
    warmup_epochs: float = 0.0  # linear warm-up length, epochs (onecycle has its own)
    step_epochs: int = 10  # step schedule: epochs between decays
    gamma: float = 0.1  # step / plateau decay factor
    label_smoothing: float = 0.0  # cross-entropy label smoothing, 0..1
    dropout: float | None = None  # override the arch's dropout rate; None keeps the arch's
    activation: str | None = None  # override the arch's activations; None keeps the arch's
    patience: int = 0  # early stopping: epochs without val improvement; 0 = off
    crop_pad: int = 4  # random-crop padding, pixels; 0 = no crop
    flip: bool = True  # random horizontal flips
    cutout: int = 0  # cutout square side, pixels; 0 = off
    seed: int = 0  # seeds model init, sample order and augmentation
    split_seed: int = 0  # seeds the validation split (kept apart so val is fixed across seeds)
    val: int = 5000  # validation images held out of train (class-balanced); 0 = none
    subset: int | None = None  # train on N training images (a fixed shuffle's first N, after val)
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "none"  # none | bf16 | fp16: autocast dtype
    channels_last: bool = True  # NHWC memory format for activations and weights
    loader: str = "tensor"  # tensor | dali: where batches are augmented
    dali_decode: bool = False  # --loader dali: DALI decodes the image files (on the GPU with CUDA)
    dali_images_per_run: int = 0  # --loader dali: images a pipeline run makes; 0 = one batch
    native: str = "auto"  # auto | on | off: fastcifar._C (the loader's op; AVX-512 bf16 pooling)
    winograd: str = "auto"  # auto | on | off: 3x3 convs as Winograd (bf16 AVX512-BF16, fp32 AVX2)
    winograd_weight_grad: str = "auto"  # auto | on | off: the Winograd convs' weight gradient too
    winograd_grad_tile: int | None = None  # 2 | 4: Winograd weight-grad tile; unset: fp32 4, bf16 2
    winograd_input_grad_tile: int = 2  # 2 | 4: the bf16 Winograd convs' input-gradient tile
    prefetch: str = "auto"  # auto | on | off: a thread makes training batches ahead (auto: off)
    compile: bool = False  # torch.compile the model
    compile_mode: str = "default"  # torch.compile mode (on CUDA reduce-overhead: CUDA graphs)
    fused: bool = False  # Triton-fused conv-BN-ReLU units (cerberus); CUDA, or TRITON_INTERPRET=1
    deterministic: bool = False  # PyTorch deterministic algorithms (CUDA too)
    threads: int = 0  # CPU intra-op threads; 0 = torch's default
    track: bool = True  # MLflow tracking (when installed)
    tracking_uri: str | None = None  # MLflow tracking URI; unset: $MLFLOW_TRACKING_URI, else local

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # inf or nan: every float setting is finite
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                flag = "--" + field.name.replace("_", "-")
                raise UserError(f"{flag} must be a finite number, not {value}")
        checks = [
            (self.epochs > 0, f"--epochs must be positive, not {self.epochs}"),
            (self.batch_size > 0, f"--batch-size must be positive, not {self.batch_size}"),
            (self.eval_batch_size > 0, "--eval-batch-size must be positive"),
            (self.lr > 0, f"--lr must be positive, not {self.lr}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
            (self.amp in AMP_MODES, f"--amp must be one of {', '.join(AMP_MODES)}"),
            (self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}"),
            (self.loader in LOADERS, f"--loader must be one of {', '.join(LOADERS)}"),
            (self.native in SWITCHES, f"--native must be one of {', '.join(SWITCHES)}"),
            (self.prefetch in SWITCHES, f"--prefetch must be one of {', '.join(SWITCHES)}"),
            (self.winograd in SWITCHES, f"--winograd must be one of {', '.join(SWITCHES)}"),
            (
                self.winograd_weight_grad in SWITCHES,
                f"--winograd-weight-grad must be one of {', '.join(SWITCHES)}, "
                f"not {self.winograd_weight_grad!r}",
            ),
            (
                self.winograd_grad_tile in (None, 2, 4),
                f"--winograd-grad-tile must be 2 or 4, not {self.winograd_grad_tile}",
            ),
            (
                self.winograd_input_grad_tile in (2, 4),
                f"--winograd-input-grad-tile must be 2 or 4, not {self.winograd_input_grad_tile}",
            ),
            (not self.dali_decode or self.loader == "dali", "--dali-decode needs --loader dali"),
            (
                self.dali_images_per_run >= 0,
                f"--dali-images-per-run must be >= 0, not {self.dali_images_per_run}",
            ),
            (
                not self.dali_images_per_run or self.loader == "dali",
                "--dali-images-per-run needs --loader dali",
            ),
            (
                self.compile_mode in COMPILE_MODES,
                f"--compile-mode must be one of {', '.join(COMPILE_MODES)}",
            ),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (self.dropout is None or 0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
            (self.patience >= 0, "--patience must be >= 0"),
            (self.val >= 0, f"--val must be >= 0, not {self.val}"),
            (self.subset is None or self.subset > 0, "--subset must be positive"),
            # a pad wider than the image crops mostly padding, and pads the data in memory
            (0 <= self.crop_pad <= 32, f"--crop-pad must be in 0..32, not {self.crop_pad}"),
            # a square wider than the image blanks most of it; from 64 on, all of it, always
            (0 <= self.cutout <= 32, f"--cutout must be in 0..32, not {self.cutout}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, not {self.warmup_epochs}"),
            (self.step_epochs > 0, f"--step-epochs must be positive, not {self.step_epochs}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, not {self.weight_decay}"),
            # momentum 1 or more makes SGD's steps grow without bound
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1), not {self.momentum}"),
            # more threads than any CPU has cores; tens of thousands crash OpenMP
            (0 <= self.threads <= 1024, f"--threads must be in 0..1024, not {self.threads}"),
            (self.gamma > 0, f"--gamma must be positive, not {self.gamma}"),
            # torch's seeds are 64-bit; 32 bits is every seed a run needs
            (0 <= self.seed <= MAX_SEED, f"--seed must be in 0..{MAX_SEED}, not {self.seed}"),
            (
                0 <= self.split_seed <= MAX_SEED,
                f"--split-seed must be in 0..{MAX_SEED}, not {self.split_seed}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if self.activation is not None:
            from fastcifar.models.layers import ACTIVATIONS  # torch: only when one is named

            if self.activation not in ACTIVATIONS:
                raise UserError(
                    f"--activation must be one of {', '.join(ACTIVATIONS)}, not {self.activation!r}"
                )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**_typed_values(values))

    def to_toml(self) -> str:
        """Every set value as a `--config` file; unset (None) values are left out."""
        lines = [f"{key} = {_toml_value(value)}" for key, value in self.to_dict().items()
                 if value is not None]  # fmt: skip
        return "\n".join(lines) + "\n"

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    return repr(value)


_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _typed(key: str, value, annotation: str):
    """`value` as the field's type (an integer is a valid float), or a one-line error
    naming the key: config files and sweeps are typed by hand."""
    kind, _, optional = annotation.partition(" | ")
    if value is None and optional == "None":
        return value
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = {"int": int, "float": float, "bool": bool, "str": str}[kind]
    if isinstance(value, expected) and (kind == "bool" or not isinstance(value, bool)):
        return value
    raise UserError(f"{key} must be {_TYPE_NAMES[kind]}, not {value!r}")


def _typed_values(values: dict) -> dict:
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    return {key: _typed(key, value, types[key]) for key, value in values.items()}


def parse_setting(text: str) -> tuple[str, object]:
    """`KEY=VALUE` from the command line as a typed config value: VALUE is read as TOML
    (`false`, `0.1`, `"x"`) and otherwise taken as a bare string (`amp=none`)."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    if not sep:
        raise UserError(f"expected KEY=VALUE, got {text!r}")
    if key not in fields:
        raise UserError(f"unknown config key {key!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, _typed(key, value, fields[key])


def read_text(path: Path, what: str = "config") -> str:
    """A text file's contents, with a one-line error for a missing or binary file."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None


def load_toml(path: Path, what: str = "config", text: str | None = None) -> dict:
    """A TOML file's contents (or `text`, read from it earlier), with a one-line error for a
    missing, binary or malformed file."""
    try:
        return tomllib.loads(read_text(path, what) if text is None else text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{what} {path} is not valid TOML: {exc}") from None


def read_config(path: Path) -> dict:
    """A `--config` file's values: TOML, or a run's `config.json` (naming the run directory
    is enough), whose `out` stays behind: the run's settings, not its place."""
    if path.is_dir():
        path = path / "config.json"
    if path.suffix != ".json":
        return read_toml(path)
    values = read_run_config(path)
    values.pop("out", None)
    return values


def read_run_config(path: Path) -> dict:
    """The values a run saved in its `config.json`, checked like a config file's."""
    try:
        values = json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"cannot read config {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise UserError(f"config {path} is not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise UserError(f"config {path} is not a JSON object")
    return _checked(values, path)


def read_toml(path: Path) -> dict:
    """A config file's values, keys as field names; unknown keys are an error."""
    return _checked({key.replace("-", "_"): value for key, value in load_toml(path).items()}, path)


def _checked(values: dict, path: Path) -> dict:
    unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise UserError(f"unknown keys in {path}: {', '.join(sorted(unknown))}")
    try:
        return _typed_values(values)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
