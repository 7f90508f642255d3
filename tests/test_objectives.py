import pytest
import torch
from torch import nn

from sdo.objectives import ClassifierMargin, GramStyle, gram_matrix


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))

    def forward(self, x):
        return x.flatten(1) @ self.w.T


def test_classifier_margin_values_and_gradient():
    labels = torch.tensor([0, 1])
    x = torch.tensor([[3.0, 1.0, 0.0], [3.0, 1.0, 0.0]], requires_grad=True)
    loss = ClassifierMargin(Linear(), labels, margin=0.5)(x)
    # item 0: true logit 3, best other 1 -> 3 - 1 + 0.5; item 1 already misclassified by 2 > margin -> 0
    torch.testing.assert_close(loss, torch.tensor([2.5, 0.0]))
    loss.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError):
        ClassifierMargin(Linear(), labels, margin=-1)


def test_gram_style_is_zero_at_the_reference_and_differentiable():
    conv = nn.Conv2d(1, 4, 3, padding=1)
    features = lambda x: [torch.tanh(conv(x)), torch.tanh(conv(x)) ** 2]
    ref = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    style = GramStyle(features, ref)
    x = torch.cat([ref, torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))]).requires_grad_(True)
    loss = style(x)
    assert loss.shape == (2,) and loss[0].item() == pytest.approx(0.0, abs=1e-12) and loss[1] > 0
    loss.sum().backward()
    assert x.grad[1].abs().sum() > 0
    assert GramStyle(features, ref, layers=[1])(x)[1] != loss[1]
    with pytest.raises(ValueError, match="layers"):
        GramStyle(features, ref, layers=[2])


def test_gram_matrix_normalization():
    f = torch.ones(1, 2, 3, 3)
    torch.testing.assert_close(gram_matrix(f), torch.full((1, 2, 2), 9.0 / 2 / 9))
