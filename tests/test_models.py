import pytest
import torch

from fastcifar.errors import UserError
from fastcifar.models import create_model, list_models
from fastcifar.summary import count_mult_adds, summarize

PAPER_PARAMS = {  # figures 2, 4, 6 and 8 of the paper
    "lenet": 62_006,
    "conv3": 110_598,
    "conv5": 3_154_982,
    "cerberus": 3_223_882,
}


@pytest.mark.parametrize("name", PAPER_PARAMS)
def test_paper_parameter_counts(name):
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PAPER_PARAMS[name]


def test_cerberus_mult_adds_match_figure_8():
    assert count_mult_adds(create_model("cerberus")) == 379_782_400


def test_lenet_mult_adds_by_hand():
    # conv1 6x28x28 outputs x 75 MACs, conv2 16x10x10 x 150, linears 400x120 + 120x84 + 84x10
    by_hand = 6 * 28 * 28 * 75 + 16 * 10 * 10 * 150 + 400 * 120 + 120 * 84 + 84 * 10
    assert count_mult_adds(create_model("lenet")) == by_hand


def test_reference_designs_sizes():
    assert sum(p.numel() for p in create_model("wide4").parameters()) == 9_074_218
    sinha = create_model("sinha14")
    convs = [m for m in sinha.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 14
    assert {(m.out_channels, m.kernel_size) for m in convs} == {(28, (5, 5))}


def test_sinha14_keeps_the_signal_through_its_14_plain_convs():
    # With torch's default conv init the features reaching the classifier had an RMS of
    # 0.016 for unit-variance input (little but the biases' noise), and training on
    # CIFAR-10 stayed at chance.
    torch.manual_seed(0)
    features = create_model("sinha14")[:-2]  # up to the flatten before the linear layer
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        out = features(x)
    assert out.shape[1:] == (28, 4, 4)
    assert 0.1 < out.pow(2).mean().sqrt() < 10


def test_conv4_family_variants_differ_as_table_1_says():
    def kinds(name):
        return [type(m).__name__ for m in create_model(name).modules() if not list(m.children())]

    assert "BatchNorm2d" not in kinds("conv4_relu")
    assert "BatchNorm2d" in kinds("conv4_relu_bn")
    assert "LeakyReLU" in kinds("conv4_leaky") and "Dropout" not in kinds("conv4_leaky")
    dropouts = [
        m.p
        for m in create_model("conv4_leaky_dropout").modules()
        if isinstance(m, torch.nn.Dropout)
    ]
    assert dropouts and set(dropouts) == {0.2}


def test_cerberus_unit_order_is_conv_relu_bn():
    layers = list(create_model("cerberus").children())
    assert [type(m).__name__ for m in layers[:3]] == ["Conv2d", "ReLU", "BatchNorm2d"]
    swapped = list(create_model("cerberus", order="bn_act").children())
    assert [type(m).__name__ for m in swapped[:3]] == ["Conv2d", "BatchNorm2d", "ReLU"]


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_every_model(name):
    torch.manual_seed(0)
    model = create_model(name).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    out = model(x)
    assert out.shape == (2, 10)
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", list_models())
def test_summary_rows_add_up(name):
    model = create_model(name)
    s = summarize(model)
    assert sum(r.params for r in s.layers) == s.total_params
    assert sum(r.mult_adds for r in s.layers) == s.mult_adds
    assert s.layers[-1].output_shape == (-1, 10)


def test_activation_override():
    model = create_model("cerberus", activation="gelu")
    assert any(isinstance(m, torch.nn.GELU) for m in model.modules())
    assert not any(isinstance(m, torch.nn.ReLU) for m in model.modules())


def test_unknown_model_and_option():
    with pytest.raises(UserError, match="unknown arch"):
        create_model("resnet9000")
    with pytest.raises(UserError, match="bad option"):
        create_model("lenet", dropout=0.5)
