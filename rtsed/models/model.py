"""The paper's models (base, dws, dil_K_d, dnd_K_d; same or causal padding) as one nn.Module.

    x: (B, T, F) normalised log-mel -> (B, 1, T, F)
    -> 3 frequency blocks (f_cnn or f_dws): (B, 256, T, 1)
    -> temporal part (GRU: (B, T, 256) | f_dil: (B, T, 256 * W))
    -> Linear per frame -> logits (B, T, C). No sigmoid inside the model.

Streaming uses the same modules through ``rtsed.stream.model_stream.ModelStream``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from rtsed.backends.dispatch import channels_last_convs, cpu_fast_path, forced_backend
from rtsed.config import ModelConfig
from rtsed.models.families import build_temporal
from rtsed.models.layers import ConvBlock, DilatedTemporal, DWSBlock, FrequencyBlock, TemporalPart


class SEDModel(nn.Module):
    """A sound event detector of the paper's grid, built from a ModelConfig."""

    def __init__(self, config: ModelConfig, temporal: TemporalPart | None = None):
        """The temporal part is the one ``config.temporal`` names, built by its registered family
        (rtsed.models.families). ``temporal``: a part given directly instead (the ``TemporalPart``
        protocol); a checkpoint can rebuild it only if its family is registered and named in the
        config. The classifier follows the part's ``out_features``."""
        super().__init__()
        self.config = config
        block_cls = DWSBlock if config.cnn == "dws" else ConvBlock
        blocks: list[FrequencyBlock] = []
        c_in = 1
        for pool in config.freq_pools:
            blocks.append(block_cls(c_in, config.channels, config.cnn_kernel, pool, config.dropout,
                                    right_pad=config.cnn_right_pad_frames))
            c_in = config.channels
        self.blocks = nn.ModuleList(blocks)
        self.temporal: TemporalPart = temporal if temporal is not None else build_temporal(config)
        self.classifier = nn.Linear(self.temporal.out_features, config.n_classes)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def lookahead_frames(self) -> int:
        """Future input frames each output frame depends on: 36 for dnd_7_10, 0 for causal models."""
        return sum(b.right_pad for b in self.blocks) + self.temporal.right_pad

    def features(self, x: Tensor) -> Tensor:
        """x: (B, T, F) -> CNN output (B, C, T, 1)."""
        if x.dim() != 3 or x.shape[-1] != self.config.n_mels:
            raise ValueError(
                f"{self.name} expects log-mel input of shape (batch, frames, {self.config.n_mels}); "
                f"got {tuple(x.shape)}"
            )
        h = x.unsqueeze(1)
        fast = cpu_fast_path(h)
        # channels-last through the CNN on CPU: 2-3x faster oneDNN convolutions, pooling and BN,
        # and 1x1 convs as one GEMM (layout only: the arithmetic is the same).
        with channels_last_convs() if fast else contextlib.nullcontext():
            if (fast and not self.training and not torch.is_grad_enabled()
                    and x.shape[1] > 2 * self.INFERENCE_CHUNK_FRAMES):
                return self._features_in_chunks(h)
            for block in self.blocks:
                h = block(h)
            return h

    # Offline inference on CPU runs the CNN over time chunks of this many output frames, so block
    # 1's (B, 256, n, 40) intermediates stay small: without a caching allocator every big tensor
    # is fresh page faults (docs/fast-paths.md); with one, chunking costs a little.
    INFERENCE_CHUNK_FRAMES = 256

    def _features_in_chunks(self, h: Tensor) -> Tensor:
        """h: (B, 1, T, F) -> CNN output (B, C, T, 1), computed chunk by chunk with a halo of
        input frames. Each block pads ITS input with zeros outside [0, T) offline, so after every
        block the frames outside [0, T) are zeroed: exactly what the unchunked forward sees."""
        frames = h.shape[2]
        left = sum(b.context_frames - b.right_pad for b in self.blocks)
        right = sum(b.right_pad for b in self.blocks)
        outputs = []
        for t0 in range(0, frames, self.INFERENCE_CHUNK_FRAMES):
            t1 = min(t0 + self.INFERENCE_CHUNK_FRAMES, frames)
            lo, hi = t0 - left, t1 + right
            chunk = h[:, :, max(lo, 0):min(hi, frames)]
            chunk = torch.nn.functional.pad(chunk, (0, 0, max(0, -lo), max(0, hi - frames)))
            start = lo  # time of the chunk's first frame
            for block in self.blocks:
                chunk = block.valid_time(chunk)
                start += block.context_frames - block.right_pad
                if start < 0 or start + chunk.shape[2] > frames:
                    t = torch.arange(start, start + chunk.shape[2])
                    chunk = chunk * ((t >= 0) & (t < frames)).to(chunk.dtype)[:, None]
            outputs.append(chunk)
        return torch.cat(outputs, dim=2)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, F) normalised log-mel -> logits (B, T, n_classes)."""
        return self.temporal.logits(self.features(x), self.classifier)


def build_model(name: str | ModelConfig, **overrides) -> SEDModel:
    """An untrained model of the paper's grid by name (``base``, ``dws``, ``dil_K_d``, ``dnd_K_d``,
    each optionally ``_causal``) or from a ModelConfig (any registered temporal family). Overrides set ModelConfig fields
    (e.g. ``n_classes=10``). Defaults to the paper's 16 classes."""
    if isinstance(name, ModelConfig):
        config = name.replace(**overrides) if overrides else name
    else:
        config = ModelConfig.from_name(name, **overrides)
    return SEDModel(config)


def count_parameters(model: nn.Module) -> int:
    """Learnable parameters (BN affine included, running statistics excluded), as in Table 1."""
    return sum(p.numel() for p in model.parameters())


def macs_per_frame(model: SEDModel, n_frames: int = 64) -> int:
    """Multiply-accumulates per output frame (convolutions, linear layers and the GRU's matrix
    products; biases, BN and activations excluded). The CNN blocks and f_dil with the classifier
    run through rtsed.ops on their tensors, so each counts its own from its shapes
    (``FrequencyBlock.macs_per_frame``); a temporal part's modules (the GRU, a classifier called as a
    module, a new family's layers) are counted by forward hooks on a real forward over n_frames."""
    total = 0

    def conv_hook(module: nn.Conv2d, inputs, output):
        nonlocal total
        k_h, k_w = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * k_h * k_w

    def linear_hook(module: nn.Linear, inputs, output):
        nonlocal total
        total += output.numel() * module.in_features

    def gru_hook(module: nn.GRU, inputs, output):
        nonlocal total
        out = output[0]
        rows = out.shape[0] * out.shape[1]
        total += rows * 3 * (module.input_size + module.hidden_size) * module.hidden_size

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.GRU):
            handles.append(m.register_forward_hook(gru_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), forced_backend("ref"):  # the stock compositions: no native build, no chunking
            model(torch.zeros(1, n_frames, model.config.n_mels))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    freq = model.config.n_mels
    for block in model.blocks:
        total += n_frames * block.macs_per_frame(freq)
        freq //= block.pool_size
    # f_dil's conv and the classifier after it run through rtsed.ops.dilated_head (F.conv2d and
    # F.linear, or a kernel), which hooks do not see: count them here.
    if isinstance(model.temporal, DilatedTemporal):
        t = model.temporal
        total += n_frames * t.conv.out_channels * t.width * t.kernel * t.kernel
        total += n_frames * model.classifier.in_features * model.classifier.out_features
    return total // n_frames
