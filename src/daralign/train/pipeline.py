"""Asynchronous online training (``async_steps: N``): the labels of the next N batches are bought
in the background while this step updates, so the trainer does not idle through the annotator.

One step t, with N = 1 (verl's "one-step-off", prime-rl's ``max_async_level``)::

    sample batch t+1 from θ_t ──► its annotation starts on the annotation thread
    wait for batch t's labels (bought while step t−1 updated)
    reference, prepare, update θ_t → θ_{t+1}                 ◄── annotation of t+1 runs meanwhile

so a batch is trained at most N updates after the policy that sampled it (``async/staleness``).
Sampling stays on the training thread for an in-process engine (HF ``generate``, colocated vLLM:
they sample the trainer's own weights): the engine, its weight pushes and every collective (DDP,
FSDP2, ZeRO-3, the shuffled control's gather) run where they run in the synchronous loop, in the
same order on every process. The annotator's call moves: one worker thread, so a batch's requests
are counted on the meter exactly as before (``annotate.py``'s ``_Spend``).

An engine that samples in another process (``samples_in_background``: the vLLM server) moves too,
onto a sampling thread, so the server generates batch t+1 while the trainer updates θ_t::

    sampling thread:    generate t+1 from θ_t ─► annotation thread: label t+1
    training thread:    wait for batch t and its labels; update θ_t → θ_{t+1}; wait for t+1's
                        generation; push θ_{t+1}                    (``wait_sampled``)

The push waits, so every batch comes from one set of weights, and the server's log-probs are π_t
(the trainer's weights have moved on by the time the batch is back). HTTP is all that thread does:
no collective, no forward of the trainer's model.

What stays exact:
- **π_t is the sampler's.** Behaviour log-probs are recorded when the batch is sampled; the loop
  turns off "π_t from the update's forward" under ``async_steps``.
- **The budget.** A batch is planned against the requests spent *and* those planned for batches
  still in flight (their nominal cost); the meter is capped once, at the run's requests left, and
  reserves every request before it is sent. When the budget is reached nothing more is sampled and
  the batches already paid for are trained. Retries cost more than the nominal plan: when they eat
  into the budget while batches are in flight, those batches may be cut short of labels (the
  synchronous loop, planning on the spend alone, would have stopped earlier); the budget still
  holds and the spend is counted.
- **Resume.** The pipeline drains at every checkpoint: no batch past a checkpoint is sampled before
  that checkpoint is written, so a run resumed from it (an empty pipeline) samples every later
  batch from the same weights at the same step as the run that was not stopped.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from daralign.core.types import Feedback, Rollout
from daralign.train.budget import Budget


@dataclass
class InFlight:
    """A batch sampled ahead: the futures of its rollout and of its labels, with their seconds."""

    step: int  # the step that will train on it
    num_prompts: int  # global prompts (what the budget planned)
    sampled: Future  # → (Rollout, seconds sampling took (its timing/rollout), its other timings)
    sampled_at: int  # the step during which it was sampled: updates θ_0…θ_{sampled_at} were done
    labels: Future  # → (Feedback, seconds the annotator took)


class Pipeline:
    """The batches sampled ahead, in step order, and the thread that buys their labels."""

    def __init__(self, depth: int, annotate: Callable[[Rollout], Feedback], budget: Budget, *, max_steps: int,
                 checkpoint_every: int, background_sampling: bool = False) -> None:
        self.depth, self.annotate, self.budget = depth, annotate, budget
        self.max_steps, self.checkpoint_every = max_steps, checkpoint_every  # 0: no checkpoints within the run
        self.in_flight: deque[InFlight] = deque()
        self.next_step = 0  # the step whose batch is sampled next
        self.stopped: str | None = None  # why nothing more is sampled (the budget)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="daralign-annotate")
        # one thread, so a server's batches are generated in step order (None: sampled on the training thread)
        self._sampler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="daralign-sample") if background_sampling else None

    @staticmethod
    def _timed_sample(sample: Callable[[int, int], tuple[Rollout, dict]], step: int, num_prompts: int):
        start = time.perf_counter()
        rollout, timing = sample(step, num_prompts)
        return rollout, time.perf_counter() - start, timing

    def _timed_annotate(self, sampled: Future) -> tuple[Feedback, float]:
        rollout = sampled.result()[0]  # a failed sampling fails the labels too: its step raises it
        start = time.perf_counter()
        return self.annotate(rollout), time.perf_counter() - start

    def affordable(self, spent_requests: int) -> tuple[int, str | None]:
        """(prompts the next batch may take, why none): planned against the requests spent *and*
        the nominal requests of the batches in flight (not yet in the run's spend)."""
        planned = sum(b.num_prompts for b in self.in_flight) * self.budget.per_prompt
        return self.budget.prompts(spent_requests + planned, cap_meter=False)

    def fill(self, step: int, spent_requests: int, sample: Callable[[int, int], tuple[Rollout, dict]]) -> float:
        """During step ``step``: sample (``sample(step, num_prompts)``, from θ_step) every batch up to
        step + depth not yet sampled and queue its annotation; never past ``max_steps``, the budget,
        or the next checkpoint (the drain). Returns the seconds spent sampling."""
        last = min(step + self.depth, self.max_steps - 1)
        if self.checkpoint_every:
            last = min(last, (step // self.checkpoint_every + 1) * self.checkpoint_every - 1)
        took = 0.0
        while self.next_step <= last and self.stopped is None:
            num_prompts, why = self.affordable(spent_requests)
            if num_prompts == 0:
                self.stopped = why
                break
            if self._sampler is not None:  # the server generates it while this step updates
                sampled = self._sampler.submit(self._timed_sample, sample, self.next_step, num_prompts)
            else:
                sampled = Future()
                sampled.set_result(self._timed_sample(sample, self.next_step, num_prompts))
                took += sampled.result()[1]
            self.in_flight.append(InFlight(self.next_step, num_prompts, sampled, step,
                                           self._pool.submit(self._timed_annotate, sampled)))
            self.next_step += 1
        return took

    def wait_sampled(self) -> float:
        """Wait until no batch is being generated (before a weight push: each batch comes from the
        weights it was asked of); the seconds waited. A failed sampling raises later, when its step
        takes it."""
        start = time.perf_counter()
        for batch in self.in_flight:
            batch.sampled.exception()
        return time.perf_counter() - start

    def more(self, spent_requests: int) -> bool:
        """Whether another batch will be trained: one in flight, or one the budget affords."""
        return bool(self.in_flight) or (self.stopped is None and self.affordable(spent_requests)[0] > 0)

    def pop(self, step: int) -> InFlight | None:
        """This step's batch, or None when none was sampled (the budget or ``max_steps`` ended it)."""
        if not self.in_flight:
            return None
        batch = self.in_flight.popleft()
        assert batch.step == step, f"pipeline out of order: step {step} got the batch of step {batch.step}"
        return batch

    def settle(self) -> None:
        """Wait until no annotation is running (before a held-out evaluation: its requests are
        counted on the same meter, in its evaluation phase). A failed annotation raises later, when
        its step takes it."""
        for batch in self.in_flight:
            batch.labels.exception()

    def unused(self) -> list[Feedback]:
        """The labels of batches bought ahead and never trained (a callback stopped the run): paid
        for, so the run counts them. Empties the pipeline."""
        labels = [batch.labels.result()[0] for batch in self.in_flight]
        self.in_flight.clear()
        return labels

    def close(self) -> None:
        for batch in self.in_flight:
            batch.sampled.cancel()
            batch.labels.cancel()
        if self._sampler is not None:
            self._sampler.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.in_flight.clear()
