"""`daralign <command> ...`: a thin dispatcher. Each command parses its own arguments and calls
the library; user errors (``DaralignError``) print one clear line, never a traceback."""

from __future__ import annotations

import importlib
import sys

from daralign.core.errors import DaralignError

# command -> "module:function(argv) -> int"; imported lazily so `daralign --help` is instant.
COMMANDS = {
    "train": ("daralign.train.command:main", "train a policy online (DAR or a baseline: --algorithm)"),
    "compare": ("daralign.compare.run:main", "run several algorithms on one annotation budget and report"),
    "eval": ("daralign.evaluation.cli:eval_main", "win rate vs a reference, or MT-bench"),
    "agreement": ("daralign.evaluation.cli:agreement_main", "AI reward vs AI preference agreement with humans"),
    "annotate": ("daralign.annotators.cli:annotate_main", "score or compare rows of a jsonl file with an annotator"),
    "fit-proxy": ("daralign.annotators.fit_proxy:main", "fit a learned proxy reward on gold-labelled pairs of the policy's answers"),
    "serve-judge": ("daralign.annotators.cli:serve_main", "serve a GGUF judge on 127.0.0.1 (OpenAI-compatible)"),
    "vllm-serve": ("daralign.rollout.vllm_server:serve_main", "serve the policy with vLLM for `vllm_mode: server`"),
    "env": ("daralign.cli:env_main", "print versions for bug reports"),
}


def env_main(argv: list[str]) -> int:
    import torch

    from daralign.core.provenance import provenance

    info = provenance()
    print(f"daralign {info['daralign']} (commit {info['git_commit'] or 'unknown'})\npython {info['python']} ({info['platform']})"
          f"\ncpu {info['cpu']}")
    for name, version in info["libraries"].items():
        print(f"{name} {version or 'not installed'}")
    print(f"cuda available: {torch.cuda.is_available()}  threads: {torch.get_num_threads()}")
    return 0


def _usage() -> str:
    lines = ["usage: daralign <command> [options]   |   daralign --version", "", "commands:"]
    lines += [f"  {name:<12} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "`daralign <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        import daralign

        print(f"daralign {daralign.__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"daralign: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func = COMMANDS[argv[0]][0].split(":")
    from daralign.core.tracking import quiet_libraries

    quiet_libraries()
    try:
        return getattr(importlib.import_module(module), func)(argv[1:]) or 0
    except DaralignError as e:
        print(f"daralign {argv[0]}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
