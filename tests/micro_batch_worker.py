"""One process of ``test_micro_batches.py``'s two-process run (torchrun + gloo on CPU): the loop
with ``max_micro_batch_tokens`` on prompts of very different lengths, recording per step this
process's padded length and how many forwards it ran (reference and update), in OUT/rank<R>.json.

    python -m torch.distributed.run --nproc_per_node 2 tests/micro_batch_worker.py CONFIG OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from daralign.train.args import parse_train_args
from daralign.train.loop import OnlineTrainer


def main(config: str, out: str) -> None:
    trainer = OnlineTrainer(*parse_train_args(["--config", config]))
    record: list[dict] = []  # one entry per step, the last being the step under way
    objective_loss, reference = trainer.objective.compute_loss, trainer._forward_token_logps

    def counted_loss(model, batch):
        record[-1]["update_forwards"] += 1
        return objective_loss(model, batch)

    def counted_reference(model, rollout, *args, **kwargs):
        record[-1]["reference_micro_batches"] += -(-rollout.input_ids.shape[0] // trainer.rows_per_micro_batch(rollout))
        return reference(model, rollout, *args, **kwargs)

    rollout = trainer.rollout

    def recorded_rollout(step, num_prompts):
        record.append({"step": step, "update_forwards": 0, "reference_micro_batches": 0})
        r, timing = rollout(step, num_prompts)
        record[-1]["padded_length"] = r.input_ids.shape[1]
        return r, timing

    trainer.objective.compute_loss, trainer._forward_token_logps, trainer.rollout = counted_loss, counted_reference, recorded_rollout
    try:
        trainer.train()
    finally:
        trainer.close()
    Path(out, f"rank{trainer.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:])
