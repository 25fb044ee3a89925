"""The padded batch sizes the decode CUDA graphs are captured at (pure arithmetic, runs anywhere)."""

from hypothesis import given
from hypothesis import strategies as st

from nanovllm.utils.buckets import graph_batch_sizes


def test_default_sizes():
    sizes = graph_batch_sizes(512)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 512 and len(sizes) == 4 + 32


def test_small_and_odd_limits():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(4096)[-1] == 512


@given(st.integers(1, 1024))
def test_every_batch_has_a_graph_with_little_padding(max_num_seqs):
    sizes = graph_batch_sizes(max_num_seqs)
    assert sizes == sorted(set(sizes)) and sizes[-1] == min(max_num_seqs, 512)
    for batch in range(1, sizes[-1] + 1):
        padded = next(b for b in sizes if b >= batch)
        assert padded - batch < min(batch, 16)  # under double the batch, and under 16 padding rows
