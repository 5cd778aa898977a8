"""Where a dnd_7_10 train step (or an offline batch) spends its time, piece by piece, against
each piece's floor on this machine.

    python -m benchmarks.profile_step                 # train step, batch 16 x 1024, Adam
    python -m benchmarks.profile_step --offline       # eval-mode inference of the same batch
    python -m benchmarks.profile_step --markdown out.md

It measures this machine's ceilings first (fp32 GEMM, 2048^3, and copy bandwidth over 1 GiB, at
torch's thread count), then profiles one step with torch.profiler and attributes every operator's
own time to a piece of the model: each CNN block's pointwise (1x1) conv, its depthwise (5x5) conv,
its elementwise work (activations, BatchNorm, max-pool, layout copies), the dilated head (f_dil +
BN + classifier, forward and backward, rtsed.backends.cpu_head), the optimizer and the rest. A piece's
compute floor is its multiply-accumulates (x3 for forward + both backward products, x1 offline)
at the GEMM ceiling; for elementwise pieces the table gives the time of one read+write pass over
the block's full-resolution tensor instead, so the measured time reads as a number of passes.

The profiler adds its own overhead and this VM's timings vary up to ~1.5x between runs; read the
shares, not the third digit. Re-executes under a caching allocator like the benchmarks.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import Tensor

from rtsed.backends.allocator import ensure_caching_allocator, loaded_allocator
from rtsed.models.model import build_model

BATCH, FRAMES = 16, 1024


def gemm_ceiling_gflops(size: int = 2048, repeats: int = 8) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def copy_bandwidth_gbs(n_bytes: int = 1 << 30, repeats: int = 4) -> float:
    """Bytes moved (read + write) per second by a tensor copy."""
    src = torch.randn(n_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    return 2 * n_bytes * repeats / (time.perf_counter() - start) / 1e9


def _block_of(shapes: list[list[int]], freqs: list[int], channels: int) -> int | None:
    """Which CNN block a backward op belongs to (forward ops carry a label): the largest
    frequency size among its (B, C, T, F) inputs with C channels (a block's pool output has the
    next block's input size, and its backward also sees the block's own full-resolution tensor,
    the larger one), or among its channels-last (B T F, C) row matrices."""
    best = None
    for shape in shapes:
        if len(shape) == 4 and shape[1] == channels and shape[3] in freqs:
            best = shape[3] if best is None else max(best, shape[3])
        elif len(shape) == 4 and shape[1] == 1 and shape[3] == freqs[0]:
            best = freqs[0] if best is None else max(best, freqs[0])  # block 1's one-channel input
        elif len(shape) == 2 and shape[1] == channels and shape[0] % BATCH == 0:
            rows_per_frame = shape[0] / (BATCH * FRAMES)  # channels-last rows (B T F, C)
            for f in freqs:
                if abs(rows_per_frame - f) < 0.5 or abs(rows_per_frame * 4 - f) < 0.5:
                    best = f if best is None else max(best, f)
    return None if best is None else freqs.index(best)


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def label_blocks(model) -> None:
    """Run each CNN block's forward under a profiler label, so forward operators (the offline
    path's chunked GEMMs included) are attributed by label rather than by shape."""
    for index, block in enumerate(model.blocks):
        inner = block.valid_time

        def labelled(x, _inner=inner, _name=f"rtsed block {index + 1}"):
            with torch.profiler.record_function(_name):
                return _inner(x)

        block.valid_time = labelled


def _kind(event, shapes: list[list[int]], channels: int) -> str:
    gemm = event.name in ("aten::addmm", "aten::mm", "aten::addmm_", "mkldnn::_linear_pointwise")
    two_d = [s for s in shapes if len(s) == 2]
    if any(len(s) == 4 and s[0] == channels and s[2:] == [1, 1] for s in shapes) or (
            gemm and any(s == [channels, channels] for s in shapes)) or (
            # rtsed.backends.cpu_block's weight gradient dp^T a: (C, rows) @ (rows, C)
            gemm and len(two_d) == 2 and two_d[0][0] == channels and two_d[1][1] == channels
            and two_d[0][1] == two_d[1][0]):
        return "pointwise 1x1 conv"
    if (any(len(s) == 4 and s[0] == channels and s[1] == 1 and s[2] > 1 for s in shapes)
            or event.name in ("aten::convolution_backward", "aten::mkldnn_convolution")
            or event.name.startswith("rtsed::native::depthwise")
            or (gemm and any(len(s) == 2 and 25 in s for s in shapes))):
        return "depthwise 5x5 conv"
    return "elementwise: activations, BN, pool, copies"


def _fast_block_backward(event, freqs: list[int]) -> int | None:
    """The CNN block whose rtsed.backends.cpu_block backward an op runs in, from that backward's
    gradient input (B, C, T, F_out): block i pools freqs[i] to freqs[i + 1] (the last to 1)."""
    pooled = freqs[1:] + [1]
    for ancestor in _ancestors(event):
        if ancestor.name.startswith("DWSBlockTrainFunctionBackward"):
            shapes = [s for s in ancestor.input_shapes if isinstance(s, (list, tuple)) and len(s) == 4]
            if shapes and shapes[0][3] in pooled:
                return pooled.index(shapes[0][3])
    return None


def attribute(events, freqs: list[int], channels: int) -> dict[str, float]:
    """Seconds of self time per piece (operators: aten::, mkldnn::, rtsed::native::)."""
    pieces: dict[str, float] = defaultdict(float)
    for event in events:
        if "::" not in event.name or event.self_cpu_time_total <= 0:
            continue
        names = [a.name for a in _ancestors(event)]
        seconds = event.self_cpu_time_total / 1e6
        if event.name == "rtsed::native::head_logits" or any(n.startswith("DilatedHeadFunction") for n in names):
            pieces["head: f_dil + BN + classifier (fast_head)"] += seconds
            continue
        if any("Optimizer.step" in n or "Adam" in n for n in names):
            pieces["optimizer (Adam)"] += seconds
            continue
        shapes = [list(s) for s in event.input_shapes if isinstance(s, (list, tuple))]
        labels = [n for n in names if n.startswith("rtsed block ")]
        block = int(labels[0].split()[-1]) - 1 if labels else _fast_block_backward(event, freqs)
        block = _block_of(shapes, freqs, channels) if block is None else block
        if block is None:
            pieces["other (loss, head input, glue)"] += seconds
            continue
        pieces[f"block {block + 1}: {_kind(event, shapes, channels)}"] += seconds
    return dict(pieces)


def isolated_times(model, x: Tensor, offline: bool, repeats: int = 3) -> list[tuple[str, float]]:
    """Wall time of each CNN block and of the head run alone on the inputs the step gives them
    (forward, plus backward of a ones gradient in training), median of ``repeats``: a direct
    measurement beside the profiler's attribution, which inflates big elementwise operators."""
    from rtsed.backends.dispatch import channels_last_convs

    with torch.no_grad(), channels_last_convs():
        inputs = [x.unsqueeze(1)]
        for block in model.blocks:
            inputs.append(block(inputs[-1]))
    parts = [(f"block {i + 1}", block, inputs[i]) for i, block in enumerate(model.blocks)]
    parts.append(("head", None, inputs[-1]))
    rows = []
    for name, block, h in parts:
        def run():
            h_in = h.detach().requires_grad_(not offline and name != "block 1")
            context = torch.inference_mode() if offline else torch.enable_grad()
            with context, channels_last_convs():
                out = block(h_in) if block is not None else model.temporal.logits(h_in, model.classifier)
                if not offline:
                    out.backward(torch.ones_like(out))
            model.zero_grad(set_to_none=True)

        run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        rows.append((name, sorted(times)[len(times) // 2]))
    return rows


def floors(model, offline: bool, gflops: float, bandwidth: float) -> dict[str, tuple[str, float]]:
    """Per piece: (what the floor is, seconds)."""
    frames = BATCH * FRAMES
    passes = 1 if offline else 3  # forward; + input gradient + weight gradient
    channels = model.blocks[0].bn.num_features
    freqs, f = [], model.config.n_mels
    for block in model.blocks:
        freqs.append(f)
        f //= block.pool.kernel_size[1]
    out: dict[str, tuple[str, float]] = {}
    for index, (block, freq) in enumerate(zip(model.blocks, freqs)):
        kernel = block.kernel
        pointwise = channels * channels * freq
        depthwise = kernel * kernel * channels * freq
        dw_passes = 1 if offline else (2 if index == 0 else 3)  # block 1 needs no input gradient
        out[f"block {index + 1}: pointwise 1x1 conv"] = (
            "MACs at GEMM ceiling", passes * 2 * pointwise * frames / (gflops * 1e9))
        out[f"block {index + 1}: depthwise 5x5 conv"] = (
            "MACs at GEMM ceiling", dw_passes * 2 * depthwise * frames / (gflops * 1e9))
        tensor_bytes = 4 * channels * freq * frames
        out[f"block {index + 1}: elementwise: activations, BN, pool, copies"] = (
            "one read+write pass", 2 * tensor_bytes / (bandwidth * 1e9))
    temporal = model.temporal
    head_macs = (temporal.kernel ** 2 * temporal.conv.out_channels * temporal.width
                 + model.classifier.in_features * model.classifier.out_features)
    out["head: f_dil + BN + classifier (fast_head)"] = (
        "MACs at GEMM ceiling", passes * 2 * head_macs * frames / (gflops * 1e9))
    return out, freqs, channels


def main(argv: list[str] | None = None) -> None:
    global BATCH, FRAMES  # the shape every helper here attributes by
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dnd_7_10")
    parser.add_argument("--offline", action="store_true", help="profile eval-mode inference, not a train step")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--frames", type=int, default=FRAMES)
    args = parser.parse_args(argv)
    BATCH, FRAMES = args.batch, args.frames
    ensure_caching_allocator()

    gflops, bandwidth = gemm_ceiling_gflops(), copy_bandwidth_gbs()
    torch.manual_seed(0)
    model = build_model(args.model)
    model.train(not args.offline)
    label_blocks(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(BATCH, FRAMES, model.config.n_mels)
    y = torch.randint(0, 2, (BATCH, FRAMES, model.config.n_classes)).float()

    def step():
        if args.offline:
            with torch.inference_mode():
                return model(x)
        optimizer.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(2):
        step()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    wall = sorted(times)[1]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        step()
        profiled_wall = time.perf_counter() - start
    isolated = isolated_times(model, x, args.offline)
    floor_table, freqs, channels = floors(model, args.offline, gflops, bandwidth)
    measured = attribute(prof.events(), freqs, channels)
    profiled_total = sum(measured.values())

    what = "offline inference" if args.offline else "train step (forward, BCE, backward, Adam)"
    lines = [
        f"## {args.model}: {what}, batch {BATCH} x {FRAMES}",
        "",
        f"{torch.get_num_threads()} threads, {loaded_allocator()}; fp32 GEMM ceiling {gflops:.0f} GFLOP/s "
        f"(2048^3), copy bandwidth {bandwidth:.1f} GB/s (read + write). Wall time, median of 3: "
        f"**{wall:.2f} s**; the profiled step took {profiled_wall:.2f} s, its operators' own time "
        f"{profiled_total:.2f} s. 'measured s' is a piece's share of that operator time times the "
        "unprofiled wall time (the profiler's overhead spread evenly).",
        "",
        "| piece | measured s | share | floor s | floor is |",
        "|---|---|---|---|---|",
    ]
    order = sorted(set(measured) | set(floor_table), key=lambda k: -measured.get(k, 0.0))
    floor_sum = 0.0
    for piece in order:
        share = measured.get(piece, 0.0) / profiled_total
        seconds = share * wall
        kind, floor = floor_table.get(piece, ("-", None))
        if floor is not None and kind.startswith("MACs"):
            floor_sum += floor
        floor_text = f"{floor:.3f}" if floor is not None else "-"
        lines.append(f"| {piece} | {seconds:.3f} | {share:.0%} | {floor_text} | {kind} |")
    lines += ["", "Each part alone (" + ("forward" if args.offline else "forward + backward") + ", median of 3): "
              + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in isolated)
              + f"; sum {sum(s for _, s in isolated):.2f} s."]
    lines += ["", f"Sum of the compute floors: {floor_sum:.2f} s (GEMM-bound pieces at the ceiling, "
              "no memory traffic counted)."]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
