"""What the user asked for, as one configuration object per concern, each checked once.

``Settings`` composes ``RotationConfig`` (R1/R2/P3/R3), ``CalibrationConfig`` (the data the
statistics and Hessians come from), ``WeightConfig`` (format, bits, blocks, rounding, clip rule,
GPTQ knobs) and ``ActivationConfig`` (format, bits, symmetry, op fusion), plus the target. Each is
a frozen dataclass that checks its own ranges when it is built (``__post_init__``), and
``Settings`` checks the combinations across them, so a value that exists has been validated, once.

The enums are the single source of the choices: argparse takes its ``choices`` from them, the
planner and the targets switch on them. ``Settings.parse`` and ``Settings.replace`` take the
command line's flat option names (``OPTIONS`` maps each to its concern and field), which is
also the flat form recorded in an output's metadata (``to_json``). Model-dependent checks (a
block that must divide a layer) are the planner's and the target's.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

from .errors import PerqError

MAX_SEQ_LEN = 32768


class Choice(str, enum.Enum):
    """A string enum whose values are what the command line accepts."""

    @classmethod
    def values(cls) -> list[str]:
        return [m.value for m in cls]

    @classmethod
    def parse(cls, value, option: str):
        try:
            return cls(value)
        except ValueError:
            raise PerqError(f"{option} {value}: choose from {', '.join(cls.values())}") from None

    def __str__(self) -> str:
        return self.value


class Permute(Choice):
    MASSDIFF = "massdiff"
    ZIGZAG = "zigzag"
    RANDOM = "random"
    NONE = "none"


class ResidualRotation(Choice):
    FULL = "full"
    BLOCK = "block"
    ONLINE = "online"  # online block Hadamard at the residual readers' inputs (post-norm models)
    NONE = "none"


class Embedding(Choice):
    INT4 = "int4"    # its own INT4 block codes (GatherBlockQuantized in the genai form)
    INT8 = "int8"    # INT8 codes, one scale per token, gathered then dequantized
    TIED = "tied"    # gathered from lm_head's INT4 codes (passes/tie_lm_head.py)


class Kernel(Choice):
    """How the genai folder multiplies by its INT4 decoder weights."""
    NBITS = "nbits"  # MatMulNBits everywhere (4-bit weights read per token)
    INT8 = "int8"    # decoder linears widened to INT8 at load, int8 activations (genai_decoder.int8_matmul)
    INT8_PROMPT = "int8-prompt"  # prompts through an INT8 graph, token generation through MatMulNBits (one weight file)


class Rounding(Choice):
    RTN = "rtn"
    GPTQ = "gptq"


class Clip(Choice):
    """How weight scales are chosen (see rounding.py)."""
    MSE = "mse"
    ABSMAX = "absmax"
    ACT = "act"


class NumberFormat(Choice):
    """The 4-bit family of weights and activations: integers (``--w-bits``/``--a-bits``), or a
    microscaling FP4 format (E2M1 values with a scale per 16 or 32; formats.py)."""
    INT = "int"
    NVFP4 = "nvfp4"
    MXFP4 = "mxfp4"

    @property
    def block(self) -> int | None:
        """The format's scale block (None: the integer formats' blocks are a free choice)."""
        return {NumberFormat.NVFP4: 16, NumberFormat.MXFP4: 32}.get(self)


class TargetName(Choice):
    SIMULATE = "simulate"
    ORT = "ort"
    GENAI = "genai"
    TENSORRT = "tensorrt"


def _positive(option: str, value) -> None:
    if value is not None and value < 1:
        raise PerqError(f"{option} {value}: must be a positive integer")


def _power_of_two(option: str, value) -> None:
    if value is not None and (value < 2 or value & (value - 1)):
        raise PerqError(f"{option} {value}: block sizes are powers of two")


@dataclass(frozen=True)
class OnlineRotation:
    """R3 at the down_proj inputs: a block size b, the full-vector rotation, or none. ``given``:
    the user chose it (--block), rather than the default (which the weight-only planner may turn
    off, perq_onnx/rotation_choice.py)."""
    block: int | None = 16
    full: bool = False
    given: bool = dataclasses.field(default=True, compare=False)

    @classmethod
    def parse(cls, text: str) -> "OnlineRotation":
        if text == "full":
            return cls(None, True)
        if text == "none":
            return cls(None, False)
        try:
            b = int(text)
        except ValueError:
            raise PerqError(f"--block {text}: give a power of two, 'full' or 'none'") from None
        if b < 2 or b > 1024 or b & (b - 1):
            raise PerqError(f"--block {b}: block sizes are powers of two from 2 to 1024 (or 'full', 'none')")
        return cls(b, False)

    def __str__(self) -> str:
        return "full" if self.full else str(self.block) if self.block else "none"


@dataclass(frozen=True)
class RotationConfig:
    """The function-preserving rewrites: R1 (residual), R2 (heads), P3 (MLP permutation) and R3
    (online block rotation at down_proj)."""
    online: OnlineRotation = OnlineRotation(given=False)
    permute: Permute = Permute.MASSDIFF
    residual: ResidualRotation | None = None  # None: full where exact, else none (see pipeline)
    residual_block: int | None = None         # a block residual rotation's size (default: online block)
    heads: bool | None = None                 # None: on, except for microscaling formats (see pipeline)
    random_orthogonal: bool = False           # seeded random orthogonal where no Hadamard exists

    def __post_init__(self):
        _positive("--residual-block", self.residual_block)
        _power_of_two("--residual-block", self.residual_block)
        if self.residual is ResidualRotation.BLOCK and self.residual_block_size is None:
            raise PerqError("--residual-rotation block needs a block size: give --block N or --residual-block N")

    @property
    def residual_or_full(self) -> ResidualRotation:
        """The residual rotation to plan: the explicit choice, or full when left unset (the pipeline
        resolves unset to none first on models where R1 is not exact)."""
        return self.residual or ResidualRotation.FULL

    @property
    def rotate_heads(self) -> bool:
        """R2 as planned: the explicit choice, or on when left unset (the pipeline resolves unset
        to off first for microscaling formats)."""
        return self.heads is not False

    @property
    def residual_block_size(self) -> int | None:
        return self.residual_block or self.online.block

    @property
    def permutes_by_statistics(self) -> bool:
        """Whether a permutation depends on calibrated channel statistics."""
        by_stats = self.permute in (Permute.MASSDIFF, Permute.ZIGZAG)
        residual = self.residual is ResidualRotation.BLOCK or (self.residual is ResidualRotation.ONLINE
                                                               and self.residual_block_size is not None)
        return by_stats and (self.online.block is not None or residual)


@dataclass(frozen=True)
class CalibrationConfig:
    """Where statistics and Hessians come from: a text file, else sequences the model samples."""
    data: str | None = None
    tokenizer: str | None = None
    samples: int | None = None    # default: 32 from text, 8 data-free
    seq_len: int | None = None    # default: 512 from text, 128 data-free
    threads: int | None = None

    def __post_init__(self):
        for option, value in (("--calib-samples", self.samples), ("--seq-len", self.seq_len),
                              ("--threads", self.threads)):
            _positive(option, value)
        if self.seq_len is not None and self.seq_len < 2:
            raise PerqError(f"--seq-len {self.seq_len}: a calibration window needs at least 2 tokens")
        if self.seq_len is not None and self.seq_len > MAX_SEQ_LEN:
            raise PerqError(f"--seq-len {self.seq_len}: at most {MAX_SEQ_LEN} tokens per calibration window")


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's knobs (rounding.gptq): relative damping, lazy-update block, activation order."""
    damp: float = 0.01
    block: int = 128
    act_order: bool = True

    def __post_init__(self):
        if not 0 < self.damp <= 1:
            raise PerqError(f"--gptq-damp {self.damp}: choose a fraction of mean(diag H) in (0, 1]")
        _positive("--gptq-block", self.block)


@dataclass(frozen=True)
class WeightConfig:
    format: NumberFormat = NumberFormat.INT
    bits: int = 4                      # INT formats: 4, 8, or 16 (= float weights)
    group: int | None = None           # INT: rows per scale (None: the target's default); FP4: the format's
    symmetric: bool = True             # INT: False = asymmetric codes with a zero point per scale
    rounding: Rounding | None = None   # None: the target's default
    clip: Clip | None = None           # None: the target's default
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    float_target: bool | None = None   # round toward the float output from quantized inputs (rounding.float_target;
                                       # None: the target's default)

    def __post_init__(self):
        if self.bits not in (4, 8, 16):
            raise PerqError(f"--w-bits {self.bits}: choose 4, 8 or 16 (16 = float weights)")
        _positive("--w-group", self.group)
        if self.format is not NumberFormat.INT:
            if self.bits not in (4, 16):
                raise PerqError(f"--w-bits {self.bits}: --format {self.format} has 4-bit (E2M1) values "
                                "(or 16: float weights)")
            if not self.symmetric:
                raise PerqError(f"--w-asymmetric: --format {self.format} is symmetric (E2M1 values, no zero point)")
            if self.group not in (None, self.format.block):
                raise PerqError(f"--w-group {self.group}: --format {self.format} has one scale per "
                                f"{self.format.block} values")

    @property
    def float(self) -> bool:
        return self.bits >= 16


@dataclass(frozen=True)
class ActivationConfig:
    format: NumberFormat = NumberFormat.INT
    bits: int | None = None            # None: the target's default; 16 = float activations
    symmetric: bool = False
    clip: float = 1.0                  # INT: each token's quantization range as a fraction of its extremes
    fused: bool = False                # one perq.BlockHadamardQuantize(FP4) at down_proj

    def __post_init__(self):
        if self.bits not in (None, 4, 8, 16):
            raise PerqError(f"--a-bits {self.bits}: choose 4, 8 or 16 (16 = float activations)")
        if not 0.5 <= self.clip <= 1.0:
            raise PerqError(f"--a-clip {self.clip}: a fraction of each token's range in [0.5, 1]")
        if self.clip != 1.0 and self.fused:
            raise PerqError(f"--a-clip {self.clip:g}: the fused perq.BlockHadamardQuantize kernel quantizes the "
                            "full range; drop --fused-ops or --a-clip")
        if self.clip != 1.0 and self.format is not NumberFormat.INT:
            raise PerqError(f"--a-clip: --format {self.format} scales each block by the format's own rule")
        if self.format is not NumberFormat.INT and self.bits not in (None, 4, 16):
            raise PerqError(f"--a-bits {self.bits}: --format {self.format} quantizes activations to 4-bit "
                            "E2M1 (or 16: float activations)")


# command-line option (flat, as argparse names it) -> (concern, field)
OPTIONS = {
    "permute": ("rotation", "permute"), "residual_rotation": ("rotation", "residual"),
    "residual_block": ("rotation", "residual_block"), "head_rotation": ("rotation", "heads"),
    "random_orthogonal": ("rotation", "random_orthogonal"), "block": ("rotation", "online"),
    "calib_data": ("calibration", "data"), "tokenizer": ("calibration", "tokenizer"),
    "calib_samples": ("calibration", "samples"), "seq_len": ("calibration", "seq_len"),
    "threads": ("calibration", "threads"),
    "w_bits": ("weights", "bits"), "w_group": ("weights", "group"),
    "w_symmetric": ("weights", "symmetric"), "rounding": ("weights", "rounding"),
    "w_clip": ("weights", "clip"),
    "gptq_damp": ("weights.gptq", "damp"), "gptq_block": ("weights.gptq", "block"),
    "gptq_act_order": ("weights.gptq", "act_order"), "float_target": ("weights", "float_target"),
    "a_bits": ("activations", "bits"), "a_symmetric": ("activations", "symmetric"),
    "a_clip": ("activations", "clip"),
    "fused_ops": ("activations", "fused"),
}
CHOICES = {"permute": Permute, "residual_rotation": ResidualRotation, "rounding": Rounding, "w_clip": Clip,
           "target": TargetName, "format": NumberFormat, "embedding": Embedding, "kernel": Kernel}


@dataclass(frozen=True)
class Settings:
    rotation: RotationConfig = field(default_factory=RotationConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    weights: WeightConfig = field(default_factory=WeightConfig)
    activations: ActivationConfig = field(default_factory=ActivationConfig)
    target: TargetName = TargetName.SIMULATE
    quantize: bool = True
    float_embeddings: bool = False     # keep embedding and lm_head float (ort/tensorrt quantize them)
    embedding: Embedding | None = None  # the quantized embedding's form (targets choose; None: the target's)
    kernel: Kernel | None = None        # the genai folder's INT4 matmul kernel (None: the target's)
    seed: int = 0                      # random permutations / orthogonals, data-free calibration

    def __post_init__(self):
        if self.seed < 0:
            raise PerqError(f"--seed {self.seed}: must be zero or positive")
        if self.weights.format is not self.activations.format:
            raise PerqError(f"weights in {self.weights.format} but activations in {self.activations.format}: "
                            "--format sets both")
        if self.activations.fused and not (self.rotation.online.block and self.quantize
                                           and (self.activations.bits or 4) < 16):
            raise PerqError("--fused-ops fuses the online block rotation with activation quantization: "
                            "it needs --block N and quantized activations (--a-bits 4 or 8)")

    # ------------------------------------------------------------------------ flat options
    @classmethod
    def parse(cls, **values) -> "Settings":
        """Settings from command-line style values (option names as argparse spells them; strings
        for the choices, ``block`` as text). An unset ``block`` is the format's scale block (16 for
        int and nvfp4, 32 for mxfp4)."""
        if values.get("block") is None:
            fmt = NumberFormat.parse(values.get("format") or "int", "--format")
            values["block"] = OnlineRotation(fmt.block or 16, given=False)
        return cls().replace(**values)

    def replace(self, **values) -> "Settings":
        """A copy with the given command-line options changed (None leaves an option as it is
        for ``block``; elsewhere None means 'the default')."""
        for key, kind in CHOICES.items():
            if values.get(key) is not None and not isinstance(values[key], kind):
                values[key] = kind.parse(values[key], "--" + key.replace("_", "-"))
        if "block" in values:
            block = values.pop("block")
            if block is not None:
                values["block"] = block if isinstance(block, OnlineRotation) else OnlineRotation.parse(str(block))
        top, nested = {}, {}
        for key, value in values.items():
            if key == "format":
                nested.setdefault("weights", {})["format"] = value
                nested.setdefault("activations", {})["format"] = value
            elif key in OPTIONS:
                concern, name = OPTIONS[key]
                nested.setdefault(concern, {})[name] = value
            elif key in {f.name for f in dataclasses.fields(self)} and key not in ("rotation", "calibration",
                                                                                   "weights", "activations"):
                top[key] = value
            else:
                raise PerqError(f"unknown option '{key}'")
        gptq = nested.pop("weights.gptq", None)
        if gptq:
            nested.setdefault("weights", {})["gptq"] = dataclasses.replace(self.weights.gptq, **gptq)
        parts = {concern: dataclasses.replace(getattr(self, concern), **changes) for concern, changes in nested.items()}
        return dataclasses.replace(self, **parts, **top)

    def to_json(self) -> dict:
        """The flat options, as the command line names them (what goes into an output's metadata;
        no machine-specific settings)."""
        d = {}
        for option, (concern, name) in OPTIONS.items():
            owner = self
            for part in concern.split("."):
                owner = getattr(owner, part)
            value = getattr(owner, name)
            d[option] = str(value) if isinstance(value, (Choice, OnlineRotation)) else value
        d.update(target=str(self.target), quantize=self.quantize, float_embeddings=self.float_embeddings,
                 embedding=self.embedding and str(self.embedding), kernel=self.kernel and str(self.kernel),
                 seed=self.seed, format=str(self.weights.format))
        del d["threads"]
        return d

    # ------------------------------------------------------------------------ derived
    @property
    def needs_statistics(self) -> bool:
        return self.rotation.permutes_by_statistics

    def needs_calibration(self, have_statistics: bool) -> bool:
        """Whether calibration data must be run for permutation statistics (unless given) or for
        Hessians (GPTQ, activation-aware clipping); a target may need it for more (static scales)."""
        hessians = self.weights_quantized and (self.weights.rounding is Rounding.GPTQ or self.weights.clip is Clip.ACT
                                               or bool(self.weights.float_target))
        return hessians or (self.needs_statistics and not have_statistics)

    @property
    def weights_quantized(self) -> bool:
        return self.quantize and not self.weights.float

    @property
    def activations_quantized(self) -> bool:
        return self.quantize and (self.activations.bits or 16) < 16
