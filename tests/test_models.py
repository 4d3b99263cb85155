import pytest
import torch

from mwn.core.models import (
    FLAT_SCALE,
    MetaNet,
    ResNet,
    build_classifier,
    count_params,
    extract_state,
)


def test_resnet32_has_the_published_parameter_count():
    params, buffers = extract_state(ResNet(10))
    assert count_params(params) == 464_154
    # 1 stem BN + 15 blocks x 2 BN, each with running mean, var and num_batches_tracked
    assert len(buffers) == 31 * 3
    # option-A shortcuts add no parameters: 100 classes only change the final layer
    assert count_params(extract_state(ResNet(100))[0]) == 464_154 + 90 * (64 + 1)


@pytest.mark.parametrize("classes", [10, 100])
def test_resnet32_output_shape_and_downsampling(classes):
    model = ResNet(classes)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, classes)
    feats = model.blocks(model.bn(model.conv(torch.randn(2, 3, 32, 32))))
    assert feats.shape == (2, 64, 8, 8)  # strides 1/2/2 at widths 16/32/64


def test_resnet_depth_must_be_6n_plus_2():
    assert len(ResNet(10, depth=8).blocks) == 3
    with pytest.raises(ValueError, match="depth = 6n"):
        ResNet(10, depth=30)


def test_wide_resnet_28_10_has_the_published_size():
    wrn = build_classifier("wrn", 10, 3, 28, 160)  # width: channels of stage 1, 16 x 10
    assert count_params(extract_state(wrn)[0]) == 36_479_194  # WRN-28-10, CIFAR-10
    assert [b.conv1.out_channels for b in wrn.blocks[::4]] == [160, 320, 640]
    assert [b.shortcut is not None for b in wrn.blocks] == [True, False, False, False] * 3
    with pytest.raises(ValueError, match="depth = 6n \\+ 4"):
        build_classifier("wrn", 10, 3, 26, 160)
    small = build_classifier("wrn", 10, 1, 10, 16)
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_option_a_shortcut_is_subsample_and_zero_pad():
    block = ResNet(10).blocks[5]  # first block of stage 2: 16 -> 32 channels, stride 2
    x = torch.randn(1, 16, 8, 8)
    for p in block.parameters():
        torch.nn.init.zeros_(p)  # residual branch is then BN(0) = bias 0: output = relu(shortcut)
    out = block(x)
    assert torch.equal(out[:, 8:24], torch.relu(x[:, :, ::2, ::2]))
    assert torch.equal(out[:, :8], torch.zeros(1, 8, 4, 4))
    assert torch.equal(out[:, 24:], torch.zeros(1, 8, 4, 4))


def test_meta_net_shapes_and_range():
    net = MetaNet(100)
    assert count_params(extract_state(net)[0]) == 301
    assert count_params(extract_state(MetaNet(50, num_layers=2))[0]) == (2 * 50) + (50 * 51) + 51
    w = net(torch.linspace(0, 10, 7))
    assert w.shape == (7,) and bool(((w > 0) & (w < 1)).all())


def test_a_flat_meta_net_weighs_every_loss_near_one_half_and_draws_what_the_random_one_draws():
    torch.manual_seed(3)
    random = MetaNet(20, num_layers=2)
    after_random = torch.rand(3)
    torch.manual_seed(3)
    flat = MetaNet(20, num_layers=2, init="flat")
    assert torch.equal(torch.rand(3), after_random)  # the same random numbers consumed
    drawn = dict(random.named_parameters())
    flat_params = dict(flat.named_parameters())  # Linear, ReLU, Linear, ReLU, Linear(20, 1)
    for name, p in flat_params.items():
        if not name.startswith("net.4."):
            assert torch.equal(p, drawn[name])
    assert torch.equal(flat_params["net.4.weight"], FLAT_SCALE * drawn["net.4.weight"])
    assert torch.equal(flat_params["net.4.bias"], torch.zeros(1))
    losses = torch.linspace(0, 10, 7)
    spread = lambda net: float((net(losses).detach() - 0.5).abs().max())
    assert spread(flat) < 0.005 < spread(random)
    assert len(set(flat(losses).tolist())) > 1  # not constant: why in test_meta.py
    with pytest.raises(ValueError, match=r"init='zero': allowed values are random \| flat"):
        MetaNet(init="zero")


def test_extract_state_copies():
    model = ResNet(10, depth=8)
    params, _ = extract_state(model)
    params["fc.bias"].add_(1.0)
    assert not torch.equal(params["fc.bias"], model.fc.bias)
