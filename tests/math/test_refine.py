"""converters.math.refine: fitting parameters to fixed outputs, on a small softmax attention."""

import torch
from torch import nn

from converters.math.refine import error_of, fit_to_outputs, mixed_precision, predictions

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
    assert abs(report.error_after - error_of(predictions(student, x), y)) < 1e-6  # the parameters it reports on
    torch.testing.assert_close(report.outputs, predictions(student, x), rtol=0, atol=0)  # and their outputs


def test_an_exact_start_stays_exact():
    x, y, (A, Bk, Bv, Wq), _ = _problem(1)
    student = TinyAttention(A, Bk, Bv, Wq)
    report = fit_to_outputs(student, [student.A, student.Bk, student.Bv], x, y, steps=50, lr=1e-2, batch=3)
    assert report.error_before == report.error_after == error_of(predictions(student, x), y) < 1e-12
    torch.testing.assert_close(student.A.detach(), A, rtol=0, atol=0)


def test_each_parameter_moves_at_its_own_rate():
    x, y, (A, Bk, Bv, Wq), g = _problem(3)
    start = A + 0.3 * torch.randn(A.shape, generator=g), Bk + 0.3 * torch.randn(Bk.shape, generator=g)
    moved = {}
    for scales in ([1.0, 1.0], [1.0, 0.0], [1.0, 4.0]):
        student = TinyAttention(start[0], start[1], Bv, Wq)
        report = fit_to_outputs(student, [student.A, student.Bk], x, y, steps=20, lr=1e-2, batch=3, lr_scales=scales)
        assert report.error_after < report.error_before
        moved[scales[1]] = [(p.detach() - p0).abs().max().item() for p, p0 in zip((student.A, student.Bk), start)]
    assert moved[0.0][1] == 0.0 < moved[1.0][1] < moved[4.0][1]  # B_k: frozen, moved, moved further
    assert moved[0.0][0] > 0.0


def test_a_rate_too_high_never_returns_a_worse_layer():
    x, y, (A, Bk, Bv, Wq), g = _problem(2)
    start = A + 0.05 * torch.randn(A.shape, generator=g)
    student = TinyAttention(start, Bk, Bv, Wq)
    report = fit_to_outputs(student, [student.A], x, y, steps=20, lr=50.0, batch=2)
    assert report.error_after <= report.error_before
    if report.error_after == report.error_before:  # diverged: the start is restored exactly
        torch.testing.assert_close(student.A.detach(), start, rtol=0, atol=0)


def test_bfloat16_steps_fit_as_well_and_keep_float32_parameters():
    x, y, (A, Bk, Bv, Wq), g = _problem(3)
    start = A + 0.3 * torch.randn(A.shape, generator=g)
    reports = {}
    for autocast in (None, torch.bfloat16):
        student = TinyAttention(start, Bk, Bv, Wq)
        reports[autocast] = fit_to_outputs(student, [student.A, student.Bk, student.Bv], x, y, steps=300, lr=1e-2,
                                           batch=3, autocast=autocast)
        assert student.A.dtype == torch.float32
    full, mixed = reports[None], reports[torch.bfloat16]
    assert (full.precision, mixed.precision) == ("float32", "bfloat16")
    assert mixed.error_after < 0.3 * mixed.error_before, mixed
    assert mixed.error_after < 2 * full.error_after, (mixed, full)  # bfloat16's rounding, not a worse fit


def test_bfloat16_noise_cannot_move_an_exact_start():
    x, y, (A, Bk, Bv, Wq), _ = _problem(4)
    student = TinyAttention(A, Bk, Bv, Wq)
    report = fit_to_outputs(student, [student.A], x, y, steps=20, lr=1e-2, batch=3, autocast=torch.bfloat16)
    assert report.error_after == report.error_before < 1e-12  # checked in float32: the start is kept
    torch.testing.assert_close(student.A.detach(), A, rtol=0, atol=0)


def test_mixed_precision_names_the_autocast_dtype():
    assert mixed_precision("float32", "cpu") is None
    assert mixed_precision("bfloat16", "cpu") is torch.bfloat16
    # AVX512-BF16 without AMX ran the steps 1.6-1.8x slower than float32: auto asks for AMX
    assert mixed_precision("auto", "cpu") is (torch.bfloat16 if torch.cpu._is_amx_tile_supported() else None)
