"""Configuration as plain data: front end, model, normalisation, decoder, and the bundle of all four.

Every config is a frozen dataclass with ``to_dict()`` / ``from_dict()`` so that it round-trips through
a ``weights_only=True`` checkpoint and through ONNX metadata (JSON). Names carry their units
(``hop_samples``, ``sample_rate_hz``, ``min_event_s``).

Model names follow the paper's Table 1 (see docs/reference.md):

====================  =========================================  ============================
name                  front end (f_cnn or f_dws)                  temporal part
====================  =========================================  ============================
``base``              3 x (Conv2d 5x5 -> ReLU -> BN -> pool)       GRU 256 -> 256
``dws``               3 x depthwise-separable blocks               GRU 256 -> 256
``dil_K_d``           3 x (Conv2d 5x5 ...)                         f_dil: K x K, dilation (d, 1)
``dnd_K_d``           3 x depthwise-separable blocks               f_dil: K x K, dilation (d, 1)
====================  =========================================  ============================

Any name may end in ``_causal``: every convolution then pads time on the left only (no lookahead).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

# The 16 classes of TUT-SED Synthetic 2016, spelled as in its annotation files, in the order
# the models output them by default.
TUT_SED_2016_LABELS: tuple[str, ...] = (
    "alarms_and_sirens",
    "baby_crying",
    "bird_singing",
    "bus",
    "cat_meowing",
    "crowd_applause",
    "crowd_cheering",
    "dog_barking",
    "footsteps",
    "glass_smash",
    "gun_shot",
    "horsewalk",
    "mixer",
    "motorcycle",
    "rain",
    "thunder",
)

PADDINGS = ("same", "causal")
CNN_KINDS = ("conv", "dws")
TEMPORAL_KINDS = ("gru", "dilated")  # the paper's temporal families, always registered

# Every temporal family a ModelConfig may name: the paper's two, and those registered with
# rtsed.models.families.register_temporal (which holds the code that builds each family; the
# config, plain data, only holds the names).
_temporal_families: list[str] = list(TEMPORAL_KINDS)


def temporal_families() -> tuple[str, ...]:
    """The temporal family names ``ModelConfig.temporal`` accepts now."""
    return tuple(_temporal_families)


def declare_temporal_family(name: str) -> None:
    """Let ModelConfig name ``name`` (rtsed.models.families.register_temporal calls this; use that)."""
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ConfigError(f"a temporal family name is lower-case letters, digits and '_', got {name!r}")
    if name not in _temporal_families:
        _temporal_families.append(name)

# f_dil's stride over the CNN-channel axis. The paper's parameter counts for K = 3 and 5 are
# reproduced only with S = 2, for K = 7 with S = 3 (docs/reference.md); other K default to 2.
_DEFAULT_DIL_STRIDE = {3: 2, 5: 2, 7: 3}

_MODEL_NAME = re.compile(
    r"^(?P<family>base|dws|dil|dnd)(?:_(?P<k>\d+)_(?P<d>\d+))?(?P<causal>_causal)?$"
)

T = TypeVar("T", bound="_Config")


class ConfigError(ValueError):
    """A configuration that cannot be built; the message names the field and a valid choice."""


class _Config:
    """Shared to_dict/from_dict for the frozen config dataclasses (plain types only)."""

    _nested: ClassVar[dict[str, type]] = {}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, _Config):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(names)}"
            )
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            nested = cls._nested.get(key)
            if nested is not None and isinstance(value, dict):
                value = nested.from_dict(value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class FrontendConfig(_Config):
    """Log-mel front end. Defaults are the paper's: 44.1 kHz, 40 ms Hamming window, 20 ms hop,
    40 bands, no centring (frame t covers samples [t*hop, t*hop + window)).

    ``n_fft`` defaults to the window length; a longer FFT zero-pads the window symmetrically (as
    librosa does). ``fmax_hz`` None means the Nyquist frequency. Output is
    ``log(mel_power + log_offset)`` in natural log.
    """

    sample_rate_hz: int = 44100
    window_samples: int = 1764
    hop_samples: int = 882
    n_mels: int = 40
    fmin_hz: float = 0.0
    fmax_hz: float | None = None
    n_fft: int | None = None
    window: str = "hamming"
    log_offset: float = 1e-10

    def __post_init__(self) -> None:
        for name in ("sample_rate_hz", "window_samples", "hop_samples", "n_mels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"FrontendConfig.{name} must be a positive integer, got {value!r}")
        if self.n_fft is not None and self.n_fft < self.window_samples:
            raise ConfigError(
                f"FrontendConfig.n_fft ({self.n_fft}) must be >= window_samples ({self.window_samples})"
            )
        if self.window not in ("hamming", "hann"):
            raise ConfigError(f"FrontendConfig.window must be 'hamming' or 'hann', got {self.window!r}")
        nyquist = self.sample_rate_hz / 2
        fmax = self.fmax_hz if self.fmax_hz is not None else nyquist
        if not (0.0 <= self.fmin_hz < fmax <= nyquist):
            raise ConfigError(
                f"FrontendConfig needs 0 <= fmin_hz < fmax_hz <= sample_rate_hz/2 ({nyquist}); "
                f"got fmin_hz={self.fmin_hz}, fmax_hz={self.fmax_hz}"
            )
        if not self.log_offset > 0:
            raise ConfigError(f"FrontendConfig.log_offset must be > 0, got {self.log_offset}")

    @classmethod
    def for_rate(cls, sample_rate_hz: int, window_s: float = 0.04, hop_s: float = 0.02, **kw: Any):
        """The paper's 40 ms / 20 ms framing at another sample rate (16 kHz -> 640 / 320 samples)."""
        return cls(
            sample_rate_hz=sample_rate_hz,
            window_samples=round(window_s * sample_rate_hz),
            hop_samples=round(hop_s * sample_rate_hz),
            **kw,
        )

    @property
    def fft_size(self) -> int:
        return self.n_fft if self.n_fft is not None else self.window_samples

    @property
    def fmax(self) -> float:
        return self.fmax_hz if self.fmax_hz is not None else self.sample_rate_hz / 2

    @property
    def hop_s(self) -> float:
        return self.hop_samples / self.sample_rate_hz

    @property
    def window_s(self) -> float:
        return self.window_samples / self.sample_rate_hz

    def n_frames(self, n_samples: int) -> int:
        """Frames an offline pass yields for n_samples (no centring, no padding; partial frames dropped)."""
        if n_samples < self.window_samples:
            return 0
        return (n_samples - self.window_samples) // self.hop_samples + 1


@dataclass(frozen=True)
class ModelConfig(_Config):
    """One model of the paper's grid (or a variation of it).

    cnn: "conv" (f_cnn) or "dws" (f_dws). temporal: "gru", "dilated" (f_dil) or a family
    registered with rtsed.models.families.register_temporal (``temporal_families()``).
    padding: "same" (the paper; symmetric time padding, hence lookahead) or "causal".
    dil_kernel K, dil_dilation d, dil_stride S: f_dil's K x K kernel, dilation (d, 1) over
    (time, CNN channel), stride (1, S); None for other families.
    temporal_params: a registered family's own hyperparameters (plain types, as a checkpoint and
    ONNX metadata hold them); empty for the paper's families, and then left out of ``to_dict``
    so that their configs read and write exactly as before.
    """

    cnn: str = "dws"
    temporal: str = "dilated"
    padding: str = "same"
    n_classes: int = 16
    n_mels: int = 40
    channels: int = 256
    cnn_kernel: int = 5
    freq_pools: tuple[int, ...] = (5, 4, 2)
    dropout: float = 0.25
    dil_kernel: int | None = 7
    dil_dilation: int | None = 10
    dil_stride: int | None = 3
    temporal_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cnn not in CNN_KINDS:
            raise ConfigError(f"ModelConfig.cnn must be one of {CNN_KINDS}, got {self.cnn!r}")
        if self.temporal not in _temporal_families:
            raise ConfigError(
                f"ModelConfig.temporal {self.temporal!r} is not a registered temporal family; the registered "
                f"ones are {temporal_families()} (a new family: rtsed.models.families.register_temporal, "
                "before its configs or checkpoints are read)"
            )
        if not isinstance(self.temporal_params, dict) or not all(isinstance(k, str) for k in self.temporal_params):
            raise ConfigError(f"ModelConfig.temporal_params must be a mapping with str keys, got {self.temporal_params!r}")
        if self.temporal in TEMPORAL_KINDS and self.temporal_params:
            raise ConfigError(f"ModelConfig: the {self.temporal!r} family takes no temporal_params "
                              f"(got {sorted(self.temporal_params)})")
        if self.padding not in PADDINGS:
            raise ConfigError(f"ModelConfig.padding must be one of {PADDINGS}, got {self.padding!r}")
        if self.cnn_kernel % 2 != 1:
            raise ConfigError(f"ModelConfig.cnn_kernel must be odd (same padding), got {self.cnn_kernel}")
        freq = self.n_mels
        for pool in self.freq_pools:
            freq //= pool
        if freq != 1:
            raise ConfigError(
                f"ModelConfig.freq_pools {self.freq_pools} reduce {self.n_mels} mel bands to {freq}, "
                f"not 1: choose pools whose product is n_mels (e.g. (5, 4, 2) for 40 bands)"
            )
        if self.temporal == "dilated":
            k, d, s = self.dil_kernel, self.dil_dilation, self.dil_stride
            if not all(isinstance(v, int) and v > 0 for v in (k, d, s)):
                raise ConfigError(
                    "ModelConfig: dil_kernel, dil_dilation and dil_stride must be positive integers "
                    f"for a dilated model; got {k}, {d}, {s}"
                )
            if k % 2 != 1:
                raise ConfigError(f"ModelConfig.dil_kernel must be odd (same padding), got {k}")
            if k > self.channels:
                raise ConfigError(f"ModelConfig.dil_kernel {k} exceeds channels {self.channels}")
        elif any(v is not None for v in (self.dil_kernel, self.dil_dilation, self.dil_stride)):
            what = "a GRU model" if self.temporal == "gru" else f"the {self.temporal!r} family"
            raise ConfigError(f"ModelConfig: {what} takes no dil_kernel/dil_dilation/dil_stride (set None)")

    def __hash__(self) -> int:  # frozen, hence hashable, though temporal_params is a dict
        return hash(tuple(repr(sorted(v.items())) if isinstance(v, dict) else v
                          for v in (getattr(self, f.name) for f in dataclasses.fields(self))))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if not self.temporal_params:
            del out["temporal_params"]  # the paper's families: the dict every rtsed has written
        else:
            out["temporal_params"] = dict(self.temporal_params)
        return out

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        """Parse a grid name: base, dws, dil_K_d, dnd_K_d, each optionally with _causal."""
        m = _MODEL_NAME.match(name.strip().lower().removesuffix(".pt"))
        if m is None or (m["family"] in ("base", "dws")) != (m["k"] is None):
            raise ConfigError(
                f"unknown model name {name!r}: use base, dws, dil_K_d or dnd_K_d "
                "(K in 3, 5, 7; d in 1, 10, 50, 100 in the paper), optionally with '_causal', "
                "e.g. dnd_7_10 or dnd_7_10_causal"
            )
        family = m["family"]
        kw: dict[str, Any] = {
            "cnn": "dws" if family in ("dws", "dnd") else "conv",
            "temporal": "dilated" if family in ("dil", "dnd") else "gru",
            "padding": "causal" if m["causal"] else "same",
        }
        if kw["temporal"] == "dilated":
            k = int(m["k"])
            kw.update(dil_kernel=k, dil_dilation=int(m["d"]), dil_stride=_DEFAULT_DIL_STRIDE.get(k, 2))
        else:
            kw.update(dil_kernel=None, dil_dilation=None, dil_stride=None)
        kw.update(overrides)
        return cls(**kw)

    @property
    def name(self) -> str:
        """The grid name (dnd_7_10, base_causal, ...); for a registered family ``<cnn>_<family>``."""
        if self.temporal not in TEMPORAL_KINDS:
            return f"{self.cnn}_{self.temporal}" + ("_causal" if self.padding == "causal" else "")
        family = {("conv", "gru"): "base", ("dws", "gru"): "dws",
                  ("conv", "dilated"): "dil", ("dws", "dilated"): "dnd"}[(self.cnn, self.temporal)]
        if self.temporal == "dilated":
            family += f"_{self.dil_kernel}_{self.dil_dilation}"
        return family + ("_causal" if self.padding == "causal" else "")

    @property
    def dil_width(self) -> int:
        """W: f_dil output positions along the CNN-channel axis, floor((channels - K) / S) + 1."""
        assert self.dil_kernel is not None and self.dil_stride is not None
        return (self.channels - self.dil_kernel) // self.dil_stride + 1

    @property
    def cnn_right_pad_frames(self) -> int:
        """Future frames each CNN block's time convolution looks at (0 when causal)."""
        return 0 if self.padding == "causal" else (self.cnn_kernel - 1) // 2

    @property
    def temporal_right_pad_frames(self) -> int:
        """Future frames f_dil looks at (d * (K - 1) / 2 for same padding); 0 for GRU or causal.
        A registered family's lookahead is its part's ``right_pad`` (``SEDModel.lookahead_frames``)."""
        if self.temporal not in TEMPORAL_KINDS:
            raise ConfigError(f"the {self.temporal!r} family's lookahead is its part's right_pad: "
                              "ask the model (SEDModel.lookahead_frames)")
        if self.temporal == "gru" or self.padding == "causal":
            return 0
        assert self.dil_kernel is not None and self.dil_dilation is not None
        return self.dil_dilation * (self.dil_kernel - 1) // 2

    @property
    def lookahead_frames(self) -> int:
        """Total future frames one output frame depends on (36 for dnd_7_10, 0 when causal)."""
        return len(self.freq_pools) * self.cnn_right_pad_frames + self.temporal_right_pad_frames


@dataclass(frozen=True)
class NormalizationStats(_Config):
    """Per-band z-score statistics of the training split's log-mel frames: (x - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        # Plain floats only: numpy scalars would make the checkpoint unloadable with weights_only.
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != len(self.std):
            raise ConfigError(f"NormalizationStats: {len(self.mean)} means but {len(self.std)} stds")
        bad = [s for s in self.std if not (isinstance(s, (int, float)) and s > 0 and math.isfinite(s))]
        if bad:
            raise ConfigError(f"NormalizationStats: every std must be finite and > 0, got {bad[:3]}")
        if not all(math.isfinite(m) for m in self.mean):
            raise ConfigError("NormalizationStats: every mean must be finite")

    @classmethod
    def identity(cls, n_bands: int) -> "NormalizationStats":
        return cls(mean=(0.0,) * n_bands, std=(1.0,) * n_bands)

    @property
    def n_bands(self) -> int:
        return len(self.mean)


@dataclass(frozen=True)
class DecoderConfig(_Config):
    """Turning frame probabilities into events: per-class hysteresis thresholds (an event starts
    when p >= on and ends when p < off), minimum event and gap durations, and median smoothing
    over ``smoothing_frames`` frames.

    Empty threshold tuples mean 0.5 for every class. ``min_event_s``, ``min_gap_s`` and
    ``smoothing_frames`` take one value for every class or a tuple with one value per class in
    the model's output order (``train.tune`` chooses them per class: a 5 s rain bed and a 0.3 s
    sneeze want different smoothing and minimum durations).
    """

    on_thresholds: tuple[float, ...] = ()
    off_thresholds: tuple[float, ...] = ()
    min_event_s: float | tuple[float, ...] = 0.0
    min_gap_s: float | tuple[float, ...] = 0.0
    smoothing_frames: int | tuple[int, ...] = 1

    def __post_init__(self) -> None:
        for name in ("on_thresholds", "off_thresholds"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        for name in ("on_thresholds", "off_thresholds"):
            for v in getattr(self, name):
                if not 0.0 < v < 1.0:
                    raise ConfigError(f"DecoderConfig.{name}: every threshold must lie in (0, 1), got {v}")
        for name, kind in (("min_event_s", float), ("min_gap_s", float), ("smoothing_frames", int)):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                if not value:
                    raise ConfigError(f"DecoderConfig.{name}: give one number or one per class, not an empty list")
                value = tuple(kind(v) for v in value)
            else:
                value = kind(value)
            object.__setattr__(self, name, value)
        for v in self._values("min_event_s") + self._values("min_gap_s"):
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"DecoderConfig: min_event_s and min_gap_s must be >= 0 seconds, got {v}")
        for v in self._values("smoothing_frames"):
            if v < 1:
                raise ConfigError(f"DecoderConfig.smoothing_frames must be >= 1 (1 = no smoothing), got {v}")

    def _values(self, name: str) -> tuple:
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,)

    def per_class(self, name: str, n_classes: int) -> tuple:
        """``min_event_s``, ``min_gap_s`` or ``smoothing_frames`` as one value per class."""
        value = getattr(self, name)
        if not isinstance(value, tuple):
            return (value,) * n_classes
        if len(value) != n_classes:
            raise ConfigError(f"DecoderConfig.{name} has {len(value)} values for {n_classes} classes; "
                              "give one value for every class or one per class")
        return value

    def thresholds(self, n_classes: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(on, off) per class, 0.5 where none were set; off never exceeds on."""
        on = self.on_thresholds or (0.5,) * n_classes
        off = self.off_thresholds or on
        if len(on) != n_classes or len(off) != n_classes:
            raise ConfigError(
                f"DecoderConfig has {len(on)} on / {len(off)} off thresholds for {n_classes} classes"
            )
        return tuple(on), tuple(min(a, b) for a, b in zip(on, off))

    def check(self, n_classes: int) -> None:
        """Raise ConfigError unless every per-class field fits ``n_classes`` classes."""
        self.thresholds(n_classes)
        for name in ("min_event_s", "min_gap_s", "smoothing_frames"):
            self.per_class(name, n_classes)

    def smoothing_delay_frames(self, n_classes: int) -> int:
        """Frames by which the median smoother delays decisions (the largest over classes): a
        median over k frames reports frame t once frame t + (k - 1) // 2 has arrived."""
        return max((k - 1) // 2 for k in self.per_class("smoothing_frames", n_classes))


@dataclass(frozen=True)
class DetectorConfig(_Config):
    """Everything a checkpoint or an ONNX file needs to run on its own: front end, model,
    class labels in output order, normalisation statistics and decoder settings."""

    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    labels: tuple[str, ...] = TUT_SED_2016_LABELS
    normalization: NormalizationStats | None = None
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    _nested: ClassVar[dict[str, type]] = {
        "frontend": FrontendConfig,
        "model": ModelConfig,
        "normalization": NormalizationStats,
        "decoder": DecoderConfig,
    }

    def __post_init__(self) -> None:
        if len(self.labels) != self.model.n_classes:
            raise ConfigError(
                f"DetectorConfig: {len(self.labels)} labels for a model with {self.model.n_classes} classes"
            )
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"DetectorConfig: duplicate labels in {self.labels}")
        if self.frontend.n_mels != self.model.n_mels:
            raise ConfigError(
                f"DetectorConfig: front end has {self.frontend.n_mels} mel bands, model expects {self.model.n_mels}"
            )
        if self.normalization is not None and self.normalization.n_bands != self.model.n_mels:
            raise ConfigError(
                f"DetectorConfig: normalisation has {self.normalization.n_bands} bands, model expects {self.model.n_mels}"
            )
        self.decoder.check(self.model.n_classes)  # raises on a length mismatch
