"""The registry of temporal families: the name a ModelConfig (and so a checkpoint or an ONNX
file's metadata) gives its temporal part, and the code that builds that part from the config.

The paper's two families, ``gru`` and ``dilated`` (f_dil), are registered here the same way a new
one is::

    register_temporal("fir", lambda config: CausalFIR(config.channels, **config.temporal_params))

after which ``ModelConfig(temporal="fir", temporal_params={...})`` validates, ``build_model`` /
``SEDModel(config)`` build the part, and ``load_checkpoint`` rebuilds it. The part implements
``rtsed.models.layers.TemporalPart`` (the streaming-state protocol), so the torch stream, the ONNX
graphs and the engines run it without edits elsewhere (docs/streaming.md). Registration is
per process: code that reads a checkpoint of a new family registers the family first.
"""

from __future__ import annotations

from typing import Callable

from rtsed.config import TEMPORAL_KINDS, ConfigError, ModelConfig, declare_temporal_family, temporal_families
from rtsed.models.layers import DilatedTemporal, GRUTemporal, TemporalPart

TemporalFactory = Callable[[ModelConfig], TemporalPart]

_factories: dict[str, TemporalFactory] = {}


def register_temporal(name: str, factory: TemporalFactory, *, replace: bool = False) -> None:
    """Make ``name`` a temporal family: ``factory(config)`` builds its part (a TemporalPart) for a
    ModelConfig whose ``temporal`` is ``name`` (its hyperparameters in ``config.temporal_params``).
    Registering a name twice is an error unless ``replace`` (the paper's families cannot be
    replaced: bundled checkpoints rely on them)."""
    if not callable(factory):
        raise TypeError(f"register_temporal({name!r}): the factory must be callable, got {type(factory).__name__}")
    if name in _factories and not replace:
        raise ConfigError(f"temporal family {name!r} is registered already (replace=True to replace it)")
    if name in TEMPORAL_KINDS and name in _factories:
        raise ConfigError(f"the paper's temporal family {name!r} cannot be replaced")
    declare_temporal_family(name)  # ModelConfig validates names against these
    _factories[name] = factory


def registered_temporal() -> tuple[str, ...]:
    """The registered family names."""
    return tuple(_factories)


def build_temporal(config: ModelConfig) -> TemporalPart:
    """The temporal part ``config`` names, built by its family's factory."""
    factory = _factories.get(config.temporal)
    if factory is None:  # named in the config layer but its code never registered here
        raise ConfigError(f"no factory for temporal family {config.temporal!r}; registered: {registered_temporal()} "
                          f"(names: {temporal_families()})")
    part = factory(config)
    if not isinstance(part, TemporalPart):
        raise TypeError(f"the {config.temporal!r} factory returned a {type(part).__name__}, not a TemporalPart")
    return part


def _gru(config: ModelConfig) -> TemporalPart:
    return GRUTemporal(config.channels, config.channels)


def _dilated(config: ModelConfig) -> TemporalPart:
    assert config.dil_kernel and config.dil_dilation and config.dil_stride
    return DilatedTemporal(config.channels, config.dil_kernel, config.dil_dilation, config.dil_stride,
                           right_pad=config.temporal_right_pad_frames)


register_temporal("gru", _gru)
register_temporal("dilated", _dilated)
