"""Random add / schedule / finish / preempt sequences keep the block manager consistent."""

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.engine.factories import make_scheduler, make_seq

actions = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 70), st.integers(0, 3)),
        st.tuples(st.just("step"), st.integers(0, 40), st.integers(0, 0)),
        st.tuples(st.just("finish"), st.integers(0, 10), st.integers(0, 0)),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(actions=actions, block_size=st.sampled_from([16, 32]), num_blocks=st.integers(5, 12))
def test_random_workloads_keep_invariants(actions, block_size, num_blocks):
    sched = make_scheduler(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=4,
        max_num_batched_tokens=160,
        max_model_len=min(80, num_blocks * block_size),
    )
    bm = sched.block_manager
    prefixes = [[30 + i] * 40 for i in range(4)]  # shared prefixes make prefix-cache hits likely
    alive = []
    for kind, a, b in actions:
        if kind == "add":
            tokens = (prefixes[b] + list(range(100, 100 + a)))[: min(a + 20, sched.max_model_len)]
            seq = make_seq(tokens, block_size=block_size, max_tokens=10)
            sched.add(seq)
            alive.append(seq)
        elif kind == "step":
            out = sched.schedule()
            for seq in out.seqs:  # what the model runner relies on
                assert len(seq.block_table) == seq.num_blocks
                assert seq.num_cached_tokens < seq.num_tokens
            sched.update(out, [3 + a] * len(out.seqs))
        elif kind == "finish":
            running = list(sched.running)
            if running:
                sched.finish(running[a % len(running)], "abort")
        live = [s for s in alive if not s.is_finished]
        bm.check_integrity([s for s in live if s.block_table])
        assert all(not s.block_table for s in sched.waiting)
        assert bm.num_free_blocks + sum(1 for blk in bm.blocks if blk.ref_count) == num_blocks
    # Drain: everything finishes and every block comes back.
    for _ in range(2000):
        if sched.is_finished():
            break
        out = sched.schedule()
        sched.update(out, [3] * len(out.seqs))
    assert sched.is_finished()
    assert bm.num_free_blocks == num_blocks
    bm.check_integrity([])
