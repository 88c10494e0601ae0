"""What the user asked for, parsed once into typed settings.

The enums are the single source of the choices: argparse takes its `choices` from them, the
planner switches on them. ``Settings.validate()`` checks everything that can be checked without
the model (ranges, combinations); the planner checks the rest against the model's structure.
"""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass

from .errors import PerqError


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
    NONE = "none"


class Rounding(Choice):
    RTN = "rtn"
    GPTQ = "gptq"


class Clip(Choice):
    """How weight scales are chosen (see rounding.py)."""
    MSE = "mse"
    ABSMAX = "absmax"
    ACT = "act"


class TargetName(Choice):
    SIMULATE = "simulate"
    ORT = "ort"
    TENSORRT = "tensorrt"


@dataclass(frozen=True)
class OnlineRotation:
    """R3 at the down_proj inputs: a block size b, the full-vector rotation, or none."""
    block: int | None = 16
    full: bool = False

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

    @property
    def enabled(self) -> bool:
        return self.full or self.block is not None

    def __str__(self) -> str:
        return "full" if self.full else str(self.block) if self.block else "none"


MAX_SEQ_LEN = 32768


@dataclass(frozen=True)
class Settings:
    online: OnlineRotation = OnlineRotation()
    permute: Permute = Permute.MASSDIFF
    residual_rotation: ResidualRotation | None = None  # None: full where exact, else none (see pipeline)
    residual_block: int | None = None     # block size of a block residual rotation (default: online block)
    head_rotation: bool = True
    quantize: bool = True
    target: TargetName = TargetName.SIMULATE
    w_bits: int = 4
    w_group: int | None = None            # None: the target's default
    a_bits: int | None = None             # None: the target's default
    a_symmetric: bool = False
    rounding: Rounding | None = None      # None: the target's default
    w_clip: Clip | None = None            # None: the target's default
    fused_ops: bool = False
    float_embeddings: bool = False        # keep embedding and lm_head float (ort/tensorrt quantize them)
    random_orthogonal: bool = False       # seeded random orthogonal where no Hadamard exists
    seed: int = 0
    calib_data: str | None = None
    tokenizer: str | None = None
    calib_samples: int | None = None      # default: 32 from text, 8 data-free
    seq_len: int | None = None            # default: 512 from text, 128 data-free
    threads: int | None = None

    @classmethod
    def parse(cls, block: str | None = None, **values) -> "Settings":
        """Settings from command-line style values (strings for the choices, block as text)."""
        kinds = {"permute": Permute, "residual_rotation": ResidualRotation, "rounding": Rounding,
                 "target": TargetName, "w_clip": Clip}
        for key, kind in kinds.items():
            if values.get(key) is not None:
                values[key] = kind.parse(values[key], "--" + key.replace("_", "-"))
        if block is not None:
            values["online"] = OnlineRotation.parse(str(block))
        return cls(**values).validate()

    def validate(self) -> "Settings":
        if self.w_bits not in (4, 8, 16):
            raise PerqError(f"--w-bits {self.w_bits}: choose 4, 8 or 16 (16 = float weights)")
        if self.a_bits not in (None, 4, 8, 16):
            raise PerqError(f"--a-bits {self.a_bits}: choose 4, 8 or 16 (16 = float activations)")
        for option, value in (("--w-group", self.w_group), ("--calib-samples", self.calib_samples),
                              ("--seq-len", self.seq_len), ("--threads", self.threads),
                              ("--residual-block", self.residual_block)):
            if value is not None and value < 1:
                raise PerqError(f"{option} {value}: must be a positive integer")
        if self.seed < 0:
            raise PerqError(f"--seed {self.seed}: must be zero or positive")
        if self.seq_len is not None and self.seq_len < 2:
            raise PerqError(f"--seq-len {self.seq_len}: a calibration window needs at least 2 tokens")
        if self.seq_len is not None and self.seq_len > MAX_SEQ_LEN:
            raise PerqError(f"--seq-len {self.seq_len}: at most {MAX_SEQ_LEN} tokens per calibration window")
        rb = self.residual_block
        if rb is not None and (rb < 2 or rb & (rb - 1)):
            raise PerqError(f"--residual-block {rb}: block sizes are powers of two")
        if self.residual_rotation is ResidualRotation.BLOCK and self.residual_block_size is None:
            raise PerqError("--residual-rotation block needs a block size: give --block N or --residual-block N")
        if self.fused_ops and not (self.online.block and self.quantize and (self.a_bits or 4) < 16):
            raise PerqError("--fused-ops fuses the online block rotation with activation quantization: "
                            "it needs --block N and quantized activations (--a-bits 4 or 8)")
        return self

    @property
    def residual(self) -> ResidualRotation:
        """The residual rotation to plan: the explicit choice, or full when left unset (the pipeline
        resolves unset to none first on models where R1 is not exact)."""
        return self.residual_rotation or ResidualRotation.FULL

    @property
    def residual_block_size(self) -> int | None:
        return self.residual_block or self.online.block

    @property
    def needs_statistics(self) -> bool:
        """Whether a permutation depends on calibrated channel statistics."""
        by_stats = self.permute in (Permute.MASSDIFF, Permute.ZIGZAG)
        return by_stats and (self.online.block is not None or self.residual_rotation is ResidualRotation.BLOCK)

    def needs_calibration(self, have_statistics: bool) -> bool:
        """Whether calibration data must be run: for permutation statistics (unless given) or
        for Hessians (GPTQ, activation-aware clipping)."""
        hessians = self.weights_quantized and (self.rounding is Rounding.GPTQ or self.w_clip is Clip.ACT)
        return hessians or (self.needs_statistics and not have_statistics)

    @property
    def weights_quantized(self) -> bool:
        return self.quantize and self.w_bits < 16

    @property
    def activations_quantized(self) -> bool:
        return self.quantize and (self.a_bits or 16) < 16

    def to_json(self) -> dict:
        """What goes into the output's metadata (no machine-specific settings)."""
        d = {k: (str(v) if isinstance(v, (Choice, OnlineRotation)) else v) for k, v in asdict(self).items()}
        d["block"] = str(self.online)
        del d["online"], d["threads"]
        return d
