"""Random arrivals, prompt lengths, budgets and cache sizes against a fake runner that checks every
K/V it reads: after every step the invariants hold, and greedy outputs equal the unchunked run."""

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.engine.factories import make_scheduler, make_seq
from tests.engine.fake_runner import FakeRunner

actions = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 70), st.integers(0, 3)),
        st.tuples(st.just("step"), st.integers(0, 3), st.integers(0, 0)),
        st.tuples(st.just("abort"), st.integers(0, 10), st.integers(0, 0)),
    ),
    min_size=1,
    max_size=60,
)


def run(actions, block_size, num_blocks, budget, chunked, max_num_seqs=4):
    """Play ``actions``; return the completions of the sequences that were not aborted."""
    max_model_len = min(100, num_blocks * block_size)
    sched = make_scheduler(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget if chunked else max(budget, max_model_len),
        max_model_len=max_model_len,
        enable_chunked_prefill=chunked,
    )
    runner = FakeRunner(num_blocks, block_size)
    bm = sched.block_manager
    prefixes = [[30 + i] * 40 for i in range(4)]  # shared prefixes make prefix-cache hits likely
    seqs, aborted = [], set()

    def step():
        out = sched.schedule()
        assert out.total_num_scheduled_tokens <= sched.max_num_batched_tokens
        assert len(out.num_scheduled_tokens) <= max_num_seqs
        sched.update(out, runner.execute_model(out))
        bm.check_integrity(sched.running)
        assert all(not s.block_table for s in sched.waiting)

    for kind, a, b in actions:
        if kind == "add":
            tokens = (prefixes[b] + list(range(100, 100 + a)))[: min(a + 20, max_model_len - 1)]
            seq = make_seq(tokens, block_size=block_size, max_tokens=10, ignore_eos=True)
            sched.add(seq)
            seqs.append(seq)
        elif kind == "step":
            for _ in range(a + 1):
                step()
        elif kind == "abort" and sched.running:
            victim = sched.running[a % len(sched.running)]
            sched.finish(victim, "abort")
            aborted.add(victim.seq_id)
    for _ in range(3000):  # drain: every sequence finishes and every block comes back
        if sched.is_finished():
            break
        step()
    assert sched.is_finished() and bm.num_free_blocks == num_blocks
    bm.check_integrity([])
    for s in seqs:
        if s.seq_id not in aborted:  # every sequence ran to its end
            assert s.num_completion_tokens == min(10, max_model_len - s.num_prompt_tokens)
    return [s.completion_token_ids for s in seqs if s.seq_id not in aborted]


@settings(max_examples=120, deadline=None)
@given(
    actions=actions,
    block_size=st.sampled_from([16, 32]),
    num_blocks=st.integers(5, 14),
    budget=st.integers(8, 160),
)
def test_random_workloads_keep_invariants_and_outputs(actions, block_size, num_blocks, budget):
    chunked = run(actions, block_size, num_blocks, budget, chunked=True)
    # The same arrivals without aborts: greedy outputs do not depend on chunking or budget.
    plain_actions = [x for x in actions if x[0] != "abort"]
    ref = run(plain_actions, block_size, num_blocks, budget, chunked=False)
    again = run(plain_actions, block_size, num_blocks, budget, chunked=True)
    assert again == ref
    assert len(chunked) <= len(ref)
