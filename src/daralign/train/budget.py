"""The annotation budget, in annotator *requests* (what the user pays for): how many prompts the
next step may take, and the meter's cap that keeps retries from passing it.

The last step of a budget is cut to the prompts whose nominal requests still fit (in multiples of
the process count); the meter is capped at the requests left, reserved before each request is
sent, so a step that costs more than nominal (retries, invalid answers) ends with invalid labels
and the run stops at its budget."""

from __future__ import annotations

from daralign.annotators import Meter, requests_per_label
from daralign.objectives.base import Objective


def requests_per_prompt(objective: Objective, annotator_config: dict) -> int:
    """The cost model (of the loop's budget and of ``compare``'s plans): requests one prompt of a
    step costs when nothing is invalid or cached — the labels the objective asks per prompt (K
    scores, or the judged pairs) × the requests one label costs with this annotator."""
    labels = objective.labels_per_prompt()
    return labels * requests_per_label(annotator_config, objective.feedback_kind) if labels else 0


class Budget:
    def __init__(self, budget: int, annotator_config: dict | None, meter: Meter, objective: Objective, *,
                 prompts_per_step: int, world: int) -> None:
        self.budget, self.meter, self.world, self.full = budget, meter, world, prompts_per_step * world
        self.per_prompt = requests_per_prompt(objective, annotator_config) if budget and annotator_config is not None else 0

    def prompts(self, spent_requests: int, *, cap_meter: bool = True) -> tuple[int, str | None]:
        """(prompts the next step may take, why it takes none); caps the meter for that step
        (``cap_meter``; under ``async_steps`` the meter is capped once, by ``cap_run``)."""
        if not self.per_prompt:
            return self.full, None
        left = self.budget - spent_requests
        n = min(self.full, left // self.per_prompt // self.world * self.world)
        if n == 0:
            return 0, (f"annotation budget reached: {spent_requests} of {self.budget} requests spent; "
                       f"a prompt costs {self.per_prompt}")
        if cap_meter:
            self.meter.allow(left // self.world)
        return n, None

    def cap_run(self, spent_requests: int) -> None:
        """Cap the meter at the requests the run has left (each process its share), once: batches
        sampled ahead reserve their requests at any time on the annotation thread, so a per-step cap,
        counted from the requests reserved so far, would cut batches already planned."""
        if self.per_prompt:
            self.meter.allow((self.budget - spent_requests) // self.world)
