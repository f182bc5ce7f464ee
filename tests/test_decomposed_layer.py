import torch
from torch import nn

from fedalora.adapters import DecomposedLoRALinear


def _layer(rank: int = 3, d_m: int = 5, scale: float = 1.7) -> DecomposedLoRALinear:
    torch.manual_seed(0)
    layer = DecomposedLoRALinear(nn.Linear(7, 6), rank, d_m, scale)
    with torch.no_grad():  # B0 and B2 start at zero: make every term visible
        layer.B0.normal_()
        layer.B2.normal_()
    return layer


def test_forward_equals_definition():
    layer = _layer()
    x = torch.randn(4, 7)
    W0, b0 = layer.base.weight, layer.base.bias
    expected = (
        x @ W0.T + b0 + layer.scale * (x @ ((layer.B0 + layer.B2 @ layer.B1) @ layer.M @ layer.A).T)
    )
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(
        layer.delta_weight(), layer.scale * (layer.B0 + layer.B2 @ layer.B1) @ layer.M @ layer.A
    )


def test_shapes_follow_table():
    layer = _layer(rank=3, d_m=5)
    assert layer.A.shape == (3, 7) and layer.M.shape == (5, 3)
    assert layer.B1.shape == (3, 5) and layer.B2.shape == (6, 3) and layer.B0.shape == (6, 5)
    assert not isinstance(layer.B0, nn.Parameter)  # a frozen buffer
    assert {n for n, _ in layer.named_parameters()} == {
        "A",
        "M",
        "B1",
        "B2",
        "base.weight",
        "base.bias",
    }


def test_reset_round_starts_from_exactly_b0():
    layer = _layer()
    layer.reset_round()
    assert torch.count_nonzero(layer.B2) == 0
    torch.testing.assert_close(layer.up_projection(), layer.B0 @ layer.M)


def test_fresh_layer_is_the_base_layer():
    torch.manual_seed(1)
    base = nn.Linear(7, 6)
    layer = DecomposedLoRALinear(base, 4, 2, scale=2.0)
    x = torch.randn(3, 7)
    torch.testing.assert_close(layer(x), base(x))  # B0 = B2 = 0
