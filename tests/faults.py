"""Fault injection into the real components of a real ``LLM`` (tiny checkpoint, CPU), and the
checks every fault test runs afterwards.

A fault is *injected*, not mocked: the real scheduler, runner, model, sampler, detokenizer and
engine run, and one of them raises once, at a chosen stage of a chosen kind of step:

    stage:  schedule -> prepare_inputs -> layer 0 -> ... -> last layer -> sampler
            -> (scheduler.update) -> _process -> detokenizer
    phase:  "prefill" (only prompt chunks), "decode" (only decodes), "mixed" (both)

The phase of the running step is read from the scheduler's own output, so a fault fires in the
first step of the wanted kind.
"""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from nanovllm import LLM, SamplingParams
from nanovllm.engine.detokenizer import IncrementalDetokenizer

STAGES = ["schedule", "prepare_inputs", "layer_first", "layer_last", "sampler", "detokenize", "process"]
PHASES = ["prefill", "decode", "mixed"]
NEVER = "\u2603never\u2603"  # a stop string no tiny model writes: it turns incremental detokenization on


class Injected(RuntimeError):
    """The RuntimeError a fault raises (a distinct type, so a test sees it is ours)."""


def step_phase(llm: LLM, sched) -> str | None:
    """ "prefill", "decode" or "mixed" for a SchedulerOutput of ``llm``'s scheduler; None if empty."""
    seqs = {s.seq_id: s for s in llm.engine.scheduler.running}
    kinds = set()
    for seq_id, n in sched.num_scheduled_tokens.items():
        seq = seqs[seq_id]
        kinds.add("decode" if n == 1 and seq.num_tokens > seq.num_prompt_tokens else "prefill")
    if not kinds:
        return None
    return kinds.pop() if len(kinds) == 1 else "mixed"


class Fault:
    """One fault: raise ``exc`` at ``stage`` in the first step of ``phase``, once."""

    def __init__(self, llm: LLM, stage: str, phase: str, exc: type[BaseException]):
        self.llm, self.stage, self.phase, self.exc = llm, stage, phase, exc
        self.current: str | None = None  # phase of the step being run
        self.fired = False

    def hit(self) -> None:
        if not self.fired and self.current == self.phase:
            self.fired = True
            raise self.exc(f"injected fault at {self.stage} in a {self.phase} step")


@contextmanager
def inject(llm: LLM, stage: str, phase: str, exc: type[BaseException] = Injected) -> Iterator[Fault]:
    """Install the fault for the duration of the block; everything is restored afterwards."""
    engine = llm.engine
    runner = engine.executor
    fault = Fault(llm, stage, phase, exc)
    undo: list[Callable[[], None]] = []

    def patch(obj, name: str, make) -> None:
        own = name in vars(obj)  # a class attribute is restored; an instance override is deleted
        original = vars(obj).get(name)
        setattr(obj, name, make(getattr(obj, name)))
        undo.append(lambda: setattr(obj, name, original) if own else delattr(obj, name))

    def tracked_schedule(original):
        def schedule():
            sched = original()
            fault.current = step_phase(llm, sched)
            if stage == "schedule":  # after the real schedule changed the scheduler's state
                fault.hit()
            return sched

        return schedule

    def before(original):
        def wrapper(*args, **kwargs):
            fault.hit()
            return original(*args, **kwargs)

        return wrapper

    patch(engine.scheduler, "schedule", tracked_schedule)
    if stage == "prepare_inputs":
        patch(runner, "prepare_inputs", before)
    elif stage == "process":
        patch(engine, "_process", before)
    elif stage == "detokenize":
        patch(IncrementalDetokenizer, "step", before)
    elif stage in ("layer_first", "layer_last", "sampler"):
        layers = runner.model.model.layers
        module = {"layer_first": layers[0], "layer_last": layers[-1], "sampler": runner.sampler}[stage]
        handle = module.register_forward_pre_hook(lambda *_: fault.hit())
        undo.append(handle.remove)
    elif stage != "schedule":
        raise ValueError(f"unknown stage {stage!r}")
    try:
        yield fault
    finally:
        for fn in reversed(undo):
            fn()


def check_clean(llm: LLM) -> None:
    """No request left anywhere, every block free, the block manager consistent, and the runner
    holds no sequence the scheduler has forgotten (it would never be told to drop it)."""
    engine, sched = llm.engine, llm.engine.scheduler
    bm = sched.block_manager
    bm.check_integrity(sched.running)
    assert not engine.requests, f"requests left behind: {list(engine.requests)}"
    assert not sched.waiting and not sched.running, (list(sched.waiting), sched.running)
    assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_blocks - bm.num_free_blocks} blocks leaked"
    assert not llm._inbox, f"inboxes left behind: {list(llm._inbox)}"
    held = set(getattr(engine.executor, "seqs", {}))
    assert held <= sched._runner_holds | set(sched._forget), (
        f"the runner holds {sorted(held - sched._runner_holds - set(sched._forget))} that nobody will drop"
    )


def greedy_tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    return [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]


def run_with_timeout(fn: Callable[[], object], timeout: float = 120.0) -> object:
    """Run ``fn`` in a daemon thread; a hang fails the test after ``timeout`` s instead of hanging
    the suite (the thread is left spinning, which is why it is a daemon)."""
    result: dict[str, object] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # handed to the caller below
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"did not return within {timeout:.0f} s (a hang)")
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["value"]


class ExplodesInWorker(SamplingParams):
    """SamplingParams that cannot be unpickled in a spawned process (a tensor-parallel worker):
    rank 1 fails while it receives a step that rank 0 runs. Rank 0 copies it freely."""

    def __setstate__(self, state: dict) -> None:
        import multiprocessing

        if multiprocessing.parent_process() is not None:
            raise RuntimeError("injected fault in the tensor-parallel worker")
        self.__dict__.update(state)
