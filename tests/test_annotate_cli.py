"""`daralign annotate` and `daralign serve-judge --print_command` (fast: the judge is a real
stdlib server on 127.0.0.1). The real `serve-judge` process is exercised in test_clients_server.py."""

from __future__ import annotations

import json

import pytest
from conftest import chat_reply

from daralign.annotators.cli import annotate_main, serve_main
from daralign.cli import main
from daralign.core.errors import ConfigError, DataError


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def judge_yaml(tmp_path, server, **over):
    import yaml

    cfg = {"type": "judge", "backend": "openai", "base_url": server.base_url, "model": "m", "max_retries": 0,
           "use_logprobs": False, "cache": str(tmp_path / "cache.sqlite"), **over}
    p = tmp_path / "judge.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def read(path):
    return [json.loads(line) for line in open(path)]


def test_score_rows_summary_and_rerun_from_cache(judge_http, tmp_path, capsys):
    judge_http.handler = lambda path, body, n: (
        200, chat_reply({"good": "Yes", "bad": "No"}.get(body["messages"][-1]["content"].split("<response>\n")[1].split("\n")[0], "??")), {})
    rows = [{"prompt": "p", "completion": "good", "id": 1},
            {"prompt": [{"role": "user", "content": "q"}], "completion": "bad", "id": 2},
            {"prompt": "r", "completion": "weird", "id": 3}]
    args = ["--annotator", judge_yaml(tmp_path, judge_http), "--input", write(tmp_path / "in.jsonl", rows),
            "--output", str(tmp_path / "out" / "o.jsonl"), "--chunk", "2"]
    assert annotate_main(args) == 0
    out = read(tmp_path / "out" / "o.jsonl")
    assert [(r["id"], r["score"], r["valid"]) for r in out] == [(1, 1.0, True), (2, 0.0, True), (3, None, False)]
    line = capsys.readouterr().out
    assert "rows=3 invalid=1 requests=3 cache_hits=0/3 mean_latency_s=" in line
    assert annotate_main(args) == 0  # a rerun pays nothing
    assert "requests=0 cache_hits=3/3" in capsys.readouterr().out and len(judge_http.requests) == 3


def test_compare_rows(judge_http, tmp_path, capsys):
    judge_http.handler = lambda path, body, n: (200, chat_reply("A"), {})
    rows = [{"prompt": "p", "completion_a": "x", "completion_b": "y"}]
    out = tmp_path / "o.jsonl"
    args = ["--annotator", judge_yaml(tmp_path, judge_http, mode="compare"), "--input", write(tmp_path / "in.jsonl", rows),
            "--output", str(out)]
    assert main(["annotate", *args]) == 0
    # always "A": both orders disagree about content, so the debiased preference is 0.5
    assert read(out)[0]["prob_a"] == 0.5 and "rows=1 invalid=0" in capsys.readouterr().out


@pytest.mark.parametrize(
    "rows, msg",
    [
        ([{"prompt": "p"}], r"in.jsonl:1: missing field 'completion'"),
        ([{"prompt": "p", "completion": "a"}, {"prompt": "p", "completion_a": "a", "completion_b": "b"}], r":2: mixes"),
        ([{"prompt": "p", "completion": 3}], r":1: field 'completion' must be a string"),
        ([{"prompt": "p", "completion_a": "a", "completion_b": "b"}], r"has compare rows but the judge .* mode 'score'"),
    ],
)
def test_bad_rows_name_file_line_and_field(judge_http, tmp_path, rows, msg):
    args = ["--annotator", judge_yaml(tmp_path, judge_http), "--input", write(tmp_path / "in.jsonl", rows),
            "--output", str(tmp_path / "o.jsonl")]
    with pytest.raises(DataError, match=msg):
        annotate_main(args)


def test_failure_leaves_previous_output_untouched(judge_http, tmp_path, capsys):
    judge_http.handler = lambda path, body, n: (500, b"down", {})
    out = tmp_path / "o.jsonl"
    out.write_text("previous\n")
    args = ["annotate", "--annotator", judge_yaml(tmp_path, judge_http), "--input",
            write(tmp_path / "in.jsonl", [{"prompt": "p", "completion": "a"}]), "--output", str(out)]
    assert main(args) == 1  # one clear line, no traceback
    err = capsys.readouterr().err
    assert "daralign annotate: error: judge server" in err and "Traceback" not in err
    assert out.read_text() == "previous\n" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".o.jsonl")] == []


def test_bad_annotator_yaml(tmp_path):
    p = tmp_path / "j.yaml"
    p.write_text("type: judge\nmode: score\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        annotate_main(["--annotator", str(p), "--input", write(tmp_path / "in.jsonl", [{"prompt": "p", "completion": "a"}]),
                       "--output", str(tmp_path / "o.jsonl")])


def test_serve_judge_print_command(capsys):
    assert serve_main(["--engine", "transformers", "--model", "bundled:smollm2-135m-instruct", "--port", "8123",
                       "--print_command"]) == 0
    out = capsys.readouterr().out
    assert "serve" in out and "--host 127.0.0.1 --port 8123" in out
    assert "backend: openai\nbase_url: http://127.0.0.1:8123/v1\nmodel: " in out
    with pytest.raises(ConfigError, match="--engine"):
        serve_main(["--engine", "vllm", "--print_command"])
