"""Padded decode batch sizes, shared by the CUDA graphs and the Triton decode backend."""


def decode_batch_bucket(batch: int) -> int:
    """The padded size of a decode batch: 1, 2, 4, 8, then multiples of 16. The Triton decode
    backend picks its split count from this, never from the batch itself, so a batch run eagerly
    and the same batch replayed in a CUDA graph do identical arithmetic.

    Padding waste: over batches 1-256 the padded rows are 8% of the rows on average, the worst
    being 17 -> 32 (47%) and 9 -> 16 (44%); from 64 on at most 19%. It costs little time: up to
    a few dozen rows a decode step reads the weights once whatever the row count, and a padded
    row attends to a single key and writes nothing to the cache."""
    if batch <= 8:
        return 1 << (batch - 1).bit_length()
    return (batch + 15) // 16 * 16


def orders_decode(batch: int) -> bool:
    """Whether a decode batch of ``batch`` rows is given to the attention kernel longest context
    first (``Context.decode_order``): from the 16-row bucket on. Below it the programs fit in about a
    wave, so the order buys nothing, while the host's work per step counts most there."""
    return decode_batch_bucket(batch) >= 16


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The decode buckets up to ``max_num_seqs`` (at most 512), which ends the list: the batch
    sizes the decode graphs are captured at."""
    top = min(max_num_seqs, 512)
    return sorted({min(decode_batch_bucket(b), top) for b in range(1, top + 1)})
