"""``daralign train`` for ``test_sharding.py``'s ZeRO-3 launch, without DeepSpeed's CPU shared-memory
all-reduce kernel (a ~50 s compile on a fresh 2-core machine; gloo suffices on one process). Several
commands, each after a ``--``, run one after the other in the one launched process.

    accelerate launch --config_file ZERO3_YAML tests/zero3_train.py -- train --config CFG --output_dir OUT [-- ...]
"""

import importlib
import itertools
import sys

importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # (deepspeed.comm.torch is torch itself)

from daralign.cli import main  # noqa: E402

for is_separator, command in itertools.groupby(sys.argv[1:], lambda arg: arg == "--"):
    if not is_separator and (rc := main(list(command))):
        sys.exit(rc)
