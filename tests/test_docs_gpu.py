"""docs/gpu.md's recipes are read as a user would copy them: every ``daralign train`` command line
in its code blocks parses (each flag a real setting with a valid value), every accelerate config
it names loads with accelerate's own loader, and every ``daralign vllm-serve`` line is accepted by
the server's own parser (``--print_command``: the command it would run, nothing started)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import tiny
from daralign.train.args import parse_train_args

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "gpu.md"


def command_lines() -> list[list[str]]:
    """Each shell command of the page's ```bash blocks, continuations joined, environment
    assignments, comments and a trailing ``&`` dropped, as argv tokens."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", PAGE.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):
                tokens.pop(0)
            if tokens and tokens[-1] == "&":
                tokens.pop()
            if tokens:
                out.append(tokens)
    return out


def after(tokens: list[str], word: str) -> list[str]:
    return tokens[tokens.index(word) + 1:]


def test_the_page_has_the_recipes_this_test_reads():
    lines = command_lines()
    assert sum("train" in t for t in lines) >= 6 and sum("vllm-serve" in t for t in lines) >= 3
    assert sum("--config_file" in t for t in lines) >= 3


def test_every_train_command_parses(tmp_path, tiny_policy_dir, tiny_prompts_file):
    cfg = tiny.run_config(tmp_path, tiny_policy_dir, tiny_prompts_file)
    for tokens in (t for t in command_lines() if "train" in t):
        argv = [str(cfg) if a == "cfg.yaml" else a for a in after(tokens, "train")]
        train, _ = parse_train_args(argv)  # an unknown flag or a bad value raises, naming it
        given = {a[2:] for a in argv if a.startswith("--") and a != "--config"}
        assert given <= set(train.__dataclass_fields__) | {f for c in train.engine_configs for f in c.__dataclass_fields__}


def test_every_accelerate_config_named_loads():
    from accelerate.commands.config.config_args import load_config_from_file

    named = {t[t.index("--config_file") + 1] for t in command_lines() if "--config_file" in t}
    assert named
    for path in named:
        assert load_config_from_file(str(REPO / path)) is not None, path


def test_every_vllm_serve_command_is_accepted(tiny_policy_dir, capsys):
    from daralign.rollout.vllm_server import serve_main

    for tokens in (t for t in command_lines() if "vllm-serve" in t):
        argv = [str(tiny_policy_dir) if a == "MODEL" else a for a in after(tokens, "vllm-serve")]
        extra = argv.index("--") if "--" in argv else len(argv)
        assert serve_main(argv[:extra] + ["--print_command"] + argv[extra:]) == 0, argv
        assert "vllm" in capsys.readouterr().out
