import torch

from converters.math.stats import InputStats


def test_update_matches_direct_moments(correlated_inputs):
    X = correlated_inputs(1000, 12, seed=1, mean_scale=1.0)
    s = InputStats.zeros(12, chunk_size=97)  # odd chunk to exercise the chunk loop
    s.update(X[:400].to(torch.float32).to(torch.float64))
    s.update(X[400:].reshape(3, 200, 12))  # any leading shape
    assert s.n == 1000
    torch.testing.assert_close(s.xx, X.T @ X)
    torch.testing.assert_close(s.mean, X.mean(0))
    torch.testing.assert_close(s.mean_abs, X.abs().mean(0))
    torch.testing.assert_close(s.autocorrelation(0.0), X.T @ X / 1000)
    Xc = X - X.mean(0)
    torch.testing.assert_close(s.covariance(centred=True), Xc.T @ Xc / 1000)
    torch.testing.assert_close(s.covariance(centred=False), s.autocorrelation())


def test_damping_is_relative_to_mean_diagonal(correlated_inputs):
    X = correlated_inputs(500, 8, seed=2)
    s = InputStats.from_activations(X)
    C = X.T @ X / 500
    lam = 0.01 * torch.diagonal(C).mean()
    torch.testing.assert_close(s.autocorrelation(0.01), C + lam * torch.eye(8, dtype=torch.float64))


def test_low_precision_input_is_accumulated_in_float64():
    x = torch.full((3000, 4), 1.0 + 2**-7, dtype=torch.bfloat16)
    s = InputStats.from_activations(x)
    assert s.xx.dtype == torch.float64
    exact = 3000 * float(x[0, 0]) ** 2
    assert abs(float(s.xx[0, 0]) - exact) < 1e-9 * exact


def test_merge_equals_single_pass(correlated_inputs):
    X = correlated_inputs(300, 6, seed=3)
    a = InputStats.from_activations(X[:100]).merge(InputStats.from_activations(X[100:]))
    b = InputStats.from_activations(X)
    assert a.n == b.n
    torch.testing.assert_close(a.xx, b.xx)
    torch.testing.assert_close(a.abs_sum, b.abs_sum)
