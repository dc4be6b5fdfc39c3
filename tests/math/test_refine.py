"""converters.math.refine: fitting parameters to fixed outputs, on a small softmax attention."""

import torch
from torch import nn

from converters.math.refine import fit_to_outputs, relative_error

N, L, D, R = 6, 12, 16, 4


class TinyAttention(nn.Module):
    """Keys and values from a rank-R latent c = A x (k = B_k c, v = B_v c), one causal softmax head."""

    def __init__(self, A, Bk, Bv, Wq):
        super().__init__()
        self.A, self.Bk, self.Bv = nn.Parameter(A.clone()), nn.Parameter(Bk.clone()), nn.Parameter(Bv.clone())
        self.Wq = Wq

    def forward(self, x):  # x [n, L, D]
        c = x @ self.A.T
        k, v, q = c @ self.Bk.T, c @ self.Bv.T, x @ self.Wq.T
        s = (q @ k.transpose(1, 2)) / D**0.5
        s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
        return torch.softmax(s, -1) @ v


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, L, D, generator=g)
    A, Bk, Bv, Wq = (torch.randn(*s, generator=g) * 0.5 for s in ((R, D), (D, R), (D, R), (D, D)))
    teacher = TinyAttention(A, Bk, Bv, Wq)
    with torch.no_grad():
        y = teacher(x)
    return x, y, (A, Bk, Bv, Wq), g


def test_fit_lowers_the_output_error_from_a_perturbed_start():
    x, y, (A, Bk, Bv, Wq), g = _problem()
    student = TinyAttention(A + 0.3 * torch.randn(A.shape, generator=g), Bk, Bv, Wq)
    params = [student.A, student.Bk, student.Bv]
    report = fit_to_outputs(student, params, x, y, steps=300, lr=1e-2, batch=3)
    assert report.error_after < 0.3 * report.error_before, report
    assert abs(report.error_after - relative_error(student, x, y)) < 1e-6  # the parameters it reports on


def test_an_exact_start_stays_exact():
    x, y, (A, Bk, Bv, Wq), _ = _problem(1)
    student = TinyAttention(A, Bk, Bv, Wq)
    report = fit_to_outputs(student, [student.A, student.Bk, student.Bv], x, y, steps=50, lr=1e-2, batch=3)
    assert report.error_before == report.error_after == relative_error(student, x, y) < 1e-12
    torch.testing.assert_close(student.A.detach(), A, rtol=0, atol=0)


def test_a_rate_too_high_never_returns_a_worse_layer():
    x, y, (A, Bk, Bv, Wq), g = _problem(2)
    start = A + 0.05 * torch.randn(A.shape, generator=g)
    student = TinyAttention(start, Bk, Bv, Wq)
    report = fit_to_outputs(student, [student.A], x, y, steps=20, lr=50.0, batch=2)
    assert report.error_after <= report.error_before
    if report.error_after == report.error_before:  # diverged: the start is restored exactly
        torch.testing.assert_close(student.A.detach(), start, rtol=0, atol=0)
