"""``daralign`` commands (``tests/cli_commands.py``) for ``test_sharding.py``'s ZeRO-3 launch, without
DeepSpeed's CPU shared-memory all-reduce kernel (a ~50 s compile on a fresh 2-core machine; gloo
suffices on one process).

    accelerate launch --config_file ZERO3_YAML tests/zero3_train.py -- train --config CFG --output_dir OUT [-- ...]
"""

import importlib
import sys

importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # (deepspeed.comm.torch is torch itself)

from cli_commands import run  # noqa: E402  (this folder is on sys.path: the script's own)

sys.exit(run(sys.argv[1:]))
