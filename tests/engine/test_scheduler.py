"""The scheduler against a fake runner: token budget, chunked prefill, mixed steps, preemption."""

from nanovllm.engine.sequence import SequenceStatus
from tests.engine.factories import EOS, make_scheduler, make_seq, run_step


def scheduled(out) -> dict[int, int]:
    return dict(out.num_scheduled_tokens)


def test_whole_prompts_then_decode_without_chunking():
    sched = make_scheduler(enable_chunked_prefill=False)
    a, b = make_seq(10), make_seq(20)
    sched.add(a)
    sched.add(b)
    out, sampled = run_step(sched)
    assert scheduled(out) == {a.seq_id: 10, b.seq_id: 20} and sampled == [a, b]
    out, _ = run_step(sched)
    assert scheduled(out) == {a.seq_id: 1, b.seq_id: 1}
    c = make_seq(5)
    sched.add(c)
    out, _ = run_step(sched)
    assert scheduled(out) == {c.seq_id: 5}  # a prefill-only step: never mixed


def test_mixed_step_decodes_first_then_admits():
    sched = make_scheduler(num_blocks=16)
    a = make_seq(10)
    sched.add(a)
    run_step(sched)
    c = make_seq(30)
    sched.add(c)
    out, sampled = run_step(sched)
    assert list(scheduled(out).items()) == [(a.seq_id, 1), (c.seq_id, 30)] and sampled == [a, c]
    assert out.cached_seqs.seq_ids == [a.seq_id] and [n.seq_id for n in out.new_seqs] == [c.seq_id]
    assert out.cached_seqs.new_token_ids == [[7]]  # the token a sampled last step


def test_long_prompt_is_chunked_and_samples_only_at_its_end():
    sched = make_scheduler(num_blocks=16, max_num_batched_tokens=32, max_model_len=200)
    a, long = make_seq(5, max_tokens=20), make_seq(100)
    sched.add(a)
    run_step(sched)
    sched.add(long)
    chunks = []
    while long.num_completion_tokens == 0:
        out, sampled = run_step(sched)
        assert scheduled(out)[a.seq_id] == 1 and a in sampled  # the decode never waits for the prefill
        chunks.append(scheduled(out)[long.seq_id])
        assert (long in sampled) == (long.num_computed_tokens == 100)
    assert chunks == [31, 31, 31, 7]
    assert len(long.block_table) == 7 and long.num_computed_tokens == 100


def test_budget_and_max_num_seqs_bound_admission():
    sched = make_scheduler(num_blocks=64, max_num_seqs=2, max_num_batched_tokens=128)
    seqs = [make_seq([100 * k + i for i in range(60)]) for k in range(1, 4)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert list(scheduled(out)) == [s.seq_id for s in seqs[:2]]
    sched = make_scheduler(num_blocks=64, max_num_seqs=4, max_num_batched_tokens=100)
    a, b = make_seq(60), make_seq([200 + i for i in range(60)])
    sched.add(a)
    sched.add(b)
    assert scheduled(sched.schedule()) == {a.seq_id: 60, b.seq_id: 40}  # b starts with a chunk


def test_prefix_hit_counts_only_uncached_tokens_and_waits_for_pending_blocks():
    sched = make_scheduler(num_blocks=64, max_num_batched_tokens=256)
    a, b = make_seq(60), make_seq(60)
    sched.add(a)
    sched.add(b)
    out, _ = run_step(sched)
    # b's first block is being computed by a in this very step: b waits a step, then hits 3 blocks.
    assert scheduled(out) == {a.seq_id: 60}
    out, _ = run_step(sched)
    assert scheduled(out) == {a.seq_id: 1, b.seq_id: 12} and b.num_prompt_cached_tokens == 48
    assert b.block_table[:3] == a.block_table[:3]


def test_finish_on_eos_and_max_tokens():
    sched = make_scheduler()
    a, b = make_seq(10, max_tokens=3), make_seq(11, max_tokens=3)
    sched.add(a)
    sched.add(b)
    run_step(sched, token=EOS)
    assert a.is_finished and a.finish_reason == "stop" and b.finish_reason == "stop"
    c = make_seq(12, max_tokens=3)
    sched.add(c)
    for _ in range(3):
        run_step(sched)
    assert c.finish_reason == "length" and c.completion_token_ids == [7, 7, 7]
    assert sched.is_finished() and sched.block_manager.num_free_blocks == 8


def test_stop_at_max_model_len():
    sched = make_scheduler(max_model_len=20)
    a = make_seq(18, max_tokens=100)
    sched.add(a)
    run_step(sched)
    run_step(sched)
    assert a.is_finished and a.num_tokens == 20 and a.finish_reason == "length"


def test_decode_preempts_most_recent_and_requeues_at_front():
    # 3 blocks of 16: a and b take one block each; when both need a second block only one fits.
    sched = make_scheduler(num_blocks=3, max_model_len=48)
    a = make_seq(list(range(100, 116)), max_tokens=40, ignore_eos=True)
    b = make_seq(list(range(200, 216)), max_tokens=40, ignore_eos=True)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # 1 block each; after the sampled token both have 17 tokens
    waiting = make_seq(40)
    sched.add(waiting)
    out, _ = run_step(sched)  # a takes the last free block, b is preempted, nothing is admitted
    assert scheduled(out) == {a.seq_id: 1}
    assert b.status == SequenceStatus.WAITING and sched.waiting[0] is b and b.block_table == []
    assert sched.num_preemptions == 1
    out, _ = run_step(sched)
    assert b.seq_id in out.finished_seq_ids or b.seq_id not in sched.fake_runner.seqs


def test_failed_step_makes_runners_resync():
    sched = make_scheduler(num_blocks=16)
    a = make_seq(20)
    sched.add(a)
    run_step(sched)
    out = sched.schedule()
    sched.runners_lost_state()  # as the engine does when the step raises
    out = sched.schedule()
    assert a.seq_id in out.finished_seq_ids and [n.seq_id for n in out.new_seqs] == [a.seq_id]
    assert out.new_seqs[0].token_ids == a.token_ids
