"""Several ``daralign`` commands, each after a ``--``, one after the other in this one process
(each process start imports torch, transformers and accelerate anew); stops at the first that fails.

    python tests/cli_commands.py -- train --config CFG --output_dir OUT [-- ...]
"""

import itertools
import sys


def run(args: list[str]) -> int:
    from daralign.cli import main

    for is_separator, command in itertools.groupby(args, lambda arg: arg == "--"):
        if not is_separator and (rc := main(list(command))):
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
