"""The paper's model grid: names, parameter counts (docs/reference.md's table, to the unit), cost,
layer order, lookahead and shapes."""

import pytest
import torch
from torch import nn

import rtsed
from rtsed.config import ConfigError, ModelConfig
from rtsed.models.layers import ConvBlock, DilatedTemporal, DWSBlock, GRUTemporal
from rtsed.models.model import build_model, count_parameters, macs_per_frame

# docs/reference.md "Parameter counts": every row, to the unit. Dilation changes no count, and the
# causal variants have the same parameters as the paper's same-padded ones.
PARAMETER_COUNTS = {
    "base": 3_684_368,
    "dws": 619_280,
    "dil_3": 3_808_784,
    "dil_5": 3_808_784,
    "dil_7": 3_642_896,
    "dnd_3": 743_696,
    "dnd_5": 743_696,
    "dnd_7": 577_808,
}


def grid_names():
    names = ["base", "dws"]
    for family in ("dil", "dnd"):
        for k in (3, 5, 7):
            for d in (1, 10, 50, 100):
                names.append(f"{family}_{k}_{d}")
    return names


@pytest.mark.parametrize("name", grid_names())
@pytest.mark.parametrize("padding", ["", "_causal"])
def test_parameter_count_matches_reference_table(name, padding):
    key = name if name in ("base", "dws") else name.rsplit("_", 1)[0]
    model = build_model(name + padding)
    assert count_parameters(model) == PARAMETER_COUNTS[key]
    assert model.name == name + padding


def test_parameter_count_pieces_match_reference():
    """docs/reference.md's pieces: f_cnn 3,285,504; f_dws 220,416; GRU 394,752; base classifier 4,112."""
    base, dnd = build_model("base"), build_model("dnd_7_10")
    assert count_parameters(base.blocks) == 3_285_504
    assert count_parameters(dnd.blocks) == 220_416
    assert count_parameters(base.temporal) == 394_752
    assert count_parameters(base.classifier) == 4_112
    k, w = 7, 84
    assert count_parameters(dnd.temporal) == 256 * k * k + 256 + 512
    assert count_parameters(dnd.classifier) == 256 * w * 16 + 16


def test_macs_per_frame_match_reference():
    assert macs_per_frame(build_model("base")) == 17_037_312
    assert macs_per_frame(build_model("dnd_7_10")) == 4_994_560
    assert macs_per_frame(build_model("dnd_7_10_causal")) == 4_994_560


@pytest.mark.parametrize("name,stride,width", [("dnd_3_1", 2, 127), ("dil_5_50", 2, 126), ("dnd_7_10", 3, 84)])
def test_dilated_stride_and_width_follow_table_1(name, stride, width):
    model = build_model(name)
    assert model.temporal.stride == stride
    assert model.temporal.width == width
    assert model.classifier.in_features == 256 * width


def test_dws_block_layer_order():
    """Depthwise conv -> LeakyReLU -> BN -> pointwise, then ReLU -> BN -> pool -> Dropout2d."""
    model = build_model("dnd_7_10")
    b1, b2 = model.blocks[0], model.blocks[1]
    assert isinstance(b1, DWSBlock)
    assert b1.depthwise.in_channels == 1 and b1.depthwise.groups == 1 and b1.depthwise.out_channels == 256
    assert b2.depthwise.groups == 256 and b2.depthwise.kernel_size == (5, 5)
    assert b2.pointwise.kernel_size == (1, 1) and b2.pointwise.padding == (0, 0)
    assert isinstance(b2.dropout, nn.Dropout2d) and b2.dropout.p == 0.25
    assert [b.pool.kernel_size for b in model.blocks] == [(1, 5), (1, 4), (1, 2)]
    # The composition, checked numerically against stock modules in the documented order.
    b2.eval()
    for bn in (b2.inner_bn, b2.bn):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    x = torch.randn(2, 256, 9, 8)
    expected = nn.functional.pad(x, (0, 0, 2, 2))
    expected = b2.depthwise(expected)
    expected = b2.inner_bn(nn.functional.leaky_relu(expected, 0.01))
    expected = b2.pointwise(expected)
    expected = b2.pool(b2.bn(torch.relu(expected)))
    torch.testing.assert_close(b2(x), expected)


def test_conv_block_relu_before_batchnorm():
    block = build_model("base").blocks[0].eval()
    assert isinstance(block, ConvBlock)
    block.bn.running_mean.fill_(1.0)  # BN before ReLU would let negative values through
    x = torch.randn(1, 1, 7, 40)
    y = block(x)
    expected = block.pool(block.bn(torch.relu(block.conv(nn.functional.pad(x, (0, 0, 2, 2))))))
    torch.testing.assert_close(y, expected)
    assert (y < 0).any()


def test_f_dil_matches_paper_reshaping():
    """f_dil reads the CNN output as a one-channel (T, 256) image and flattens channel-major."""
    model = build_model("dnd_3_10").eval()
    t = model.temporal
    assert isinstance(t, DilatedTemporal)
    h = torch.randn(2, 256, 50, 1)
    conv = nn.Conv2d(1, 256, (3, 3), stride=(1, 2), dilation=(10, 1), padding=(10, 0))
    conv.load_state_dict(t.conv.state_dict())
    y = t.bn(torch.relu(conv(h.permute(0, 3, 2, 1))))  # (B, 256, T, W)
    expected = y.permute(0, 2, 1, 3).reshape(2, 50, 256 * 127)
    torch.testing.assert_close(t(h), expected)


@pytest.mark.parametrize("name,frames", [("dnd_7_10", 36), ("base", 6), ("dil_3_100", 106), ("dnd_5_50", 106),
                                         ("dnd_7_10_causal", 0), ("base_causal", 0)])
def test_lookahead_frames(name, frames):
    assert build_model(name).lookahead_frames == frames
    assert ModelConfig.from_name(name).lookahead_frames == frames


def test_causal_output_ignores_the_future():
    model = build_model("dnd_7_10_causal").eval()
    x = torch.randn(1, 80, 40)
    y = torch.cat([x[:, :50], torch.randn(1, 30, 40)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :50], model(y)[:, :50])
        same = build_model("dnd_7_10").eval()
        assert not torch.allclose(same(x)[:, :50], same(y)[:, :50])


@pytest.mark.parametrize("name", ["base", "dws", "dil_3_1", "dnd_7_10", "dnd_5_10_causal"])
def test_forward_shapes_and_gradients(name):
    model = build_model(name, n_classes=5)
    x = torch.randn(2, 33, 40)
    logits = model(x)
    assert logits.shape == (2, 33, 5)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gru_model_uses_a_unidirectional_gru():
    model = build_model("base")
    assert isinstance(model.temporal, GRUTemporal)
    gru = model.temporal.gru
    assert (gru.input_size, gru.hidden_size, gru.num_layers, gru.bidirectional) == (256, 256, 1, False)


@pytest.mark.parametrize("bad", ["dnd", "dnd_7", "base_3_1", "crnn", "dnd_4_10", "dil_7_0", ""])
def test_bad_model_names_say_what_is_valid(bad):
    with pytest.raises(ConfigError) as info:
        build_model(bad)
    assert "dnd_7_10" in str(info.value) or "must" in str(info.value)


def test_config_round_trip_and_overrides():
    cfg = ModelConfig.from_name("dil_5_50_causal", n_classes=10)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.padding == "causal" and cfg.n_classes == 10 and cfg.dil_stride == 2
    with pytest.raises(ConfigError, match="freq_pools"):
        ModelConfig.from_name("dnd_7_10", n_mels=80)
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({**cfg.to_dict(), "colour": "red"})


def test_public_api():
    model = rtsed.build_model("dnd_7_10")
    assert isinstance(model, rtsed.SEDModel)
    assert model.config.n_classes == 16
    assert len(rtsed.TUT_SED_2016_LABELS) == 16


def test_model_rejects_wrong_input_shape():
    model = build_model("dnd_7_10")
    with pytest.raises(ValueError, match="40"):
        model(torch.randn(2, 100, 64))
