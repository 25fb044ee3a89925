"""compile_on_cuda's warm-up: the compiled function sees one row and several before the real call,
so a lone token later does not recompile mid-serving (the compiler itself runs on CUDA only)."""

import torch

from nanovllm.utils.compile import _warm_row_counts


def test_rows_sliced_like_x_and_other_arguments_untouched():
    calls = []

    def record(x, residual, weight, eps):
        calls.append((tuple(x.shape), tuple(residual.shape), tuple(weight.shape), eps))

    # weight has as many elements as x has rows: only the rank tells them apart
    x, residual, weight = torch.zeros(16, 16), torch.zeros(16, 16), torch.ones(16)
    _warm_row_counts(record, x, (residual, weight, 1e-6))
    assert calls == [((2, 16), (2, 16), (16,), 1e-6), ((1, 16), (1, 16), (16,), 1e-6)]


def test_a_single_row_is_warmed_once():
    calls = []
    _warm_row_counts(lambda x: calls.append(x.shape[0]), torch.zeros(1, 8), ())
    assert calls == [1]
