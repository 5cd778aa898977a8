"""Checkpoints: one file holding everything needed to rebuild and run a detector.

Layout (a plain dict, loadable with ``torch.load(weights_only=True)``, so no code runs from a file):

    {"format": "rtsed-checkpoint", "format_version": 1,
     "config": DetectorConfig.to_dict(),      # front end, model, labels, normalisation, decoder
     "state_dict": model weights and BN statistics,
     "metadata": plain types only (training command, epoch, scores, versions, ...),
     "content_sha256": hex SHA-256 of config and state_dict (rtsed.models.integrity.content_digest)}

Every way a file can be wrong (missing, truncated, another format or version, weights that do
not fit the config, non-finite or absurdly large weights, a content hash that no longer matches)
raises CheckpointError naming the file and the problem. Files without ``content_sha256``
(written before it existed) load, with a note in the log at INFO level.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from rtsed.atomic import OutputError, os_error_reason
from rtsed.config import ConfigError, DetectorConfig
from rtsed.models.integrity import MAX_ABS_WEIGHT, absurd_message, content_digest, modified_message
from rtsed.models.model import SEDModel

log = logging.getLogger(__name__)

FORMAT = "rtsed-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model (eval mode), its full config and metadata."""

    model: SEDModel
    config: DetectorConfig
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def save_checkpoint(path: str | os.PathLike, model: SEDModel, config: DetectorConfig,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write atomically (temporary file in the same folder, then rename), so a run killed while
    saving never leaves a half-written checkpoint in place of a good one."""
    if config.model != model.config:
        raise ConfigError(f"save_checkpoint: config.model {config.model.name} does not describe the model "
                          f"({model.config.name}); pass the model's own config")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": plain_data(dict(metadata or {}), "metadata"),
    }
    payload["content_sha256"] = checkpoint_digest(payload["config"], payload["state_dict"])
    return atomic_torch_save(payload, path)


def checkpoint_digest(config: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    """The content hash of a checkpoint's config and tensors (rtsed.models.integrity)."""
    def raw(t: torch.Tensor) -> bytes:  # any dtype, bf16 included (numpy has none)
        return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()

    return content_digest(config, ((k, str(v.dtype), tuple(v.shape), raw(v)) for k, v in state.items()))


def plain_data(value: Any, where: str) -> Any:
    """``value`` as plain Python data (dict/list/str/int/float/bool/None, tensors kept), so that
    weights_only loading accepts it: str and number subclasses (torch.__version__, numpy scalars)
    become their base types, tuples become lists; anything else is an error naming where."""
    if value is None or isinstance(value, (bool, torch.Tensor)):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalar
        return value.item()
    if isinstance(value, dict):
        return {str(k): plain_data(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where}: {type(value).__name__} cannot go into a checkpoint (plain types and tensors only)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _RecordedWrites:
    """The temporary file as torch.save sees it, remembering the OSError a write hit: torch's zip
    writer turns it into "[enforce fail at inline_container.cc] unexpected pos ...", which names
    neither the file nor the full disk."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``: a
    reader (or a run killed mid-write) sees the old file or the new one, never half of one.
    A write that fails (a full disk) removes the temporary file, leaves ``path`` as it was and
    raises OutputError naming the file and the fix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write in {path.parent}: {os_error_reason(exc)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            sink = _RecordedWrites(f)
            try:
                torch.save(obj, sink)
            except RuntimeError:
                if sink.error is None:
                    raise
                raise sink.error from None
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; a checkpoint is for sharing
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"{path}: writing failed, so it was left as it was (no partial file): "
                              f"{os_error_reason(exc)}") from None
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint and rebuild its model from its own config (eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # The line naming the refused call ("Unsupported global: GLOBAL ..." in older torch,
        # "Trying to load unsupported GLOBAL posix.system ..." in 2.13), not torch's preamble.
        unsupported = [line.strip() for line in str(exc).splitlines() if "unsupported" in line.lower()]
        raise CheckpointError(
            f"{path}: holds Python objects that safe loading (weights_only=True) refuses "
            f"({unsupported[0] if unsupported else _first_line(exc)}); rtsed checkpoints contain only "
            "tensors and plain types: re-save it with rtsed.save_checkpoint, or re-train"
        ) from exc
    except Exception as exc:  # truncated zip, not a torch file, ...
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {_first_line(exc)}); "
            "the file is truncated, corrupt or not an rtsed checkpoint: re-download or re-train it"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an rtsed checkpoint (no '{FORMAT}' format marker); "
                              "a bare state_dict needs its config: save it with rtsed.save_checkpoint")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r}, but this rtsed reads "
                              f"version {FORMAT_VERSION}; use the rtsed release that wrote it or re-train")
    for key in ("config", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"{path}: checkpoint lacks its '{key}' entry")
    try:
        config = DetectorConfig.from_dict(payload["config"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path}: invalid config: {exc}") from exc
    model = SEDModel(config.model)
    state = payload["state_dict"]
    _check_state_dict(path, model, state)
    _check_content_hash(path, payload)
    _check_values(path, state)
    model.load_state_dict(state)
    model.to(map_location).eval()
    return Checkpoint(model=model, config=config, metadata=payload.get("metadata", {}), path=path)


def _check_state_dict(path: Path, model: SEDModel, state: Any) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(state).__name__}, not a dict of tensors")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(f"wrong shapes {wrong[:5]}{' ...' if len(wrong) > 5 else ''}")
        raise CheckpointError(f"{path}: weights do not fit its config ({model.name}): " + "; ".join(parts))


def _check_values(path: Path, state: dict[str, torch.Tensor]) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: non-finite (NaN/Inf) values in {bad[:5]}; the run that wrote it "
                              "diverged, or the file is corrupt")
    huge = [(k, float(v.abs().max())) for k, v in state.items()
            if v.is_floating_point() and v.numel() and float(v.abs().max()) > MAX_ABS_WEIGHT]
    if huge:
        raise CheckpointError(absurd_message(path, huge))


def _check_content_hash(path: Path, payload: dict) -> None:
    expected = payload.get("content_sha256")
    if expected is None:
        log.info("%s: written without a content hash (an older rtsed); loaded unchecked", path)
        return
    if checkpoint_digest(payload["config"], payload["state_dict"]) != expected:
        raise CheckpointError(modified_message(path, "checkpoint"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) < 200 else line[:200] + "..."

