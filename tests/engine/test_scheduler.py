from nanovllm.engine.sequence import SequenceStatus
from tests.engine.factories import EOS, make_scheduler, make_seq


def run_step(sched, token=7):
    out = sched.schedule()
    finished = sched.update(out, [token] * len(out.seqs))
    sched.block_manager.check_integrity(list(sched.running))
    return out, finished


def test_prefill_first_then_decode():
    sched = make_scheduler()
    a, b = make_seq(10), make_seq(20)
    sched.add(a)
    sched.add(b)
    out, _ = run_step(sched)
    assert out.is_prefill and out.seqs == [a, b] and out.num_batched_tokens == 30
    out, _ = run_step(sched)
    assert not out.is_prefill and out.seqs == [a, b]
    c = make_seq(5)
    sched.add(c)
    out, _ = run_step(sched)
    assert out.is_prefill and out.seqs == [c]


def test_token_budget_and_max_num_seqs_bound_prefill():
    sched = make_scheduler(num_blocks=64, max_num_seqs=2, max_num_batched_tokens=128)
    seqs = [make_seq(60) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert out.seqs == seqs[:2]
    sched = make_scheduler(num_blocks=64, max_num_seqs=4, max_num_batched_tokens=100)
    a, b = make_seq(60), make_seq([200 + i for i in range(60)])
    sched.add(a)
    sched.add(b)
    assert sched.schedule().seqs == [a]
    # A prefix-cache hit counts only the uncached tokens against the budget.
    sched.add(make_seq(60))
    out = sched.schedule()
    assert len(out.seqs) == 2 and out.num_batched_tokens == 60 + 12


def test_finish_on_eos_and_max_tokens():
    sched = make_scheduler()
    a, b = make_seq(10, max_tokens=3), make_seq(10, max_tokens=3)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    sched.update(out, [EOS, 7])
    assert a.is_finished and a.finish_reason == "stop"
    run_step(sched)
    _, finished = run_step(sched)
    assert finished == [b] and b.finish_reason == "length" and b.completion_token_ids == [7, 7, 7]
    assert sched.is_finished() and sched.block_manager.num_free_blocks == 8


def test_stop_at_max_model_len():
    sched = make_scheduler(max_model_len=20)
    a = make_seq(18, max_tokens=100)
    sched.add(a)
    run_step(sched)
    _, finished = run_step(sched)
    assert finished == [a] and a.num_tokens == 20 and a.finish_reason == "length"


def test_decode_preempts_most_recent_and_requeues_at_front():
    # 3 blocks of 16: a and b take one block each; when both need a second block only one fits.
    sched = make_scheduler(num_blocks=3, max_model_len=48)
    a, b = make_seq(16, max_tokens=40, ignore_eos=True), make_seq(16, max_tokens=40, ignore_eos=True)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # prefill: 1 block each; after append both have 17 tokens
    waiting = make_seq(40)
    sched.add(waiting)
    out, _ = run_step(
        sched
    )  # no room to admit `waiting`; decode: a takes the last free block, b is preempted
    assert not out.is_prefill and out.seqs == [a]
    assert b.status == SequenceStatus.WAITING and sched.waiting[0] is b and b.block_table == []
    assert sched.num_preemptions == 1
