"""``daralign train`` for ``test_sharding.py``'s ZeRO-3 launch, without DeepSpeed's CPU shared-memory
all-reduce kernel (a ~50 s compile on a fresh 2-core machine; gloo suffices on one process).

    accelerate launch --config_file ZERO3_YAML tests/zero3_train.py train --config CFG --output_dir OUT
"""

import importlib
import sys

importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # (deepspeed.comm.torch is torch itself)

from daralign.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
