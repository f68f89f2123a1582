"""What every registered objective brings on its class (paper, feedback kind, labels per prompt,
its part in compare), read by the rest of the package through the registry alone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from daralign.compare.run import build_plan
from daralign.core.config import TrainConfig
from daralign.core.errors import ConfigError
from daralign.objectives import OBJECTIVES, Objective, candidate_pairs, get_objective, method_in_role, register_objective
from daralign.objectives.online_dpo import OnlineDPOConfig
from daralign.train.args import parse_train_args
from daralign.train.model_card import key_settings, write_model_card
from helpers_tiny import tiny_train


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_objective_brings_its_paper_kind_and_label_count(name):
    cls = get_objective(name)
    assert cls.paper and cls.feedback_kind in ("score", "compare", "offline"), name
    obj = cls(None if cls.Config is None else cls.Config(), tiny_train(num_generations=3))
    K = obj.num_generations()
    expected = {"score": K, "compare": len(candidate_pairs(1, K, obj.best_vs_worst)), "offline": 0}[cls.feedback_kind]
    assert obj.labels_per_prompt() == expected, name


def test_compare_roles_are_each_played_by_one_method():
    subject, reference = method_in_role("subject"), method_in_role("reference")
    assert (subject, reference) == ("dar", "online-dpo")
    assert get_objective(reference).title == "OAIF-DPO" and get_objective(subject).title == "DAR"
    # the other OAIF losses are other methods: they do not inherit the reference's role
    assert sorted(n for n, c in OBJECTIVES.items() if c.compare_role) == sorted([subject, reference])


def test_a_variant_of_a_method_does_not_take_its_part_in_compare():
    """A plug-in written as a subclass of DAR (the natural way to try a variant) is not a second
    subject: the part is declared on the class itself."""
    @register_objective("dar-variant")
    class DARVariant(get_objective("dar")):
        paper = "a variant"

    try:
        assert DARVariant.compare_role == "subject" and method_in_role("subject") == "dar"
    finally:
        OBJECTIVES.pop("dar-variant")


def test_pair_rule_and_labels_of_a_compare_method():
    train = tiny_train()
    one_pair = get_objective("online-dpo")(OnlineDPOConfig(), train)
    assert one_pair.labels_per_prompt() == 1 and candidate_pairs(2, 2, True) == [(0, 1), (2, 3)]
    round_robin = get_objective("online-dpo")(OnlineDPOConfig(oaif_num_generations=4), train)
    assert round_robin.best_vs_worst and round_robin.labels_per_prompt() == 6  # K(K-1)/2
    disjoint = get_objective("online-dpo")(OnlineDPOConfig(oaif_num_generations=4, best_vs_worst=False), train)
    assert not disjoint.best_vs_worst and disjoint.labels_per_prompt() == 2  # (0, 1), (2, 3)
    assert candidate_pairs(1, 4, False) == [(0, 1), (2, 3)]
    assert get_objective("dpo")(None, train).labels_per_prompt() == 0  # offline: the labels come with the data


@dataclass
class ShadowConfig:
    learning_rate: float = field(default=1.0, metadata={"help": "a method knob named like TrainConfig's"})


@pytest.fixture
def shadowing_objective():
    @register_objective("toy-shadow")
    class ToyShadow(Objective):
        Config = ShadowConfig
        paper = "none"

    yield ToyShadow
    OBJECTIVES.pop("toy-shadow")


def test_a_method_field_shadowing_a_train_field_is_refused_in_one_line(shadowing_objective, tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_train_args(["--algorithm", "toy-shadow"])
    text = str(err.value)
    assert "\n" not in text and "'learning_rate'" in text and "TrainConfig" in text and "ShadowConfig" in text
    with pytest.raises(ConfigError, match="learning_rate.*TrainConfig.*ShadowConfig"):  # compare refuses it when planning
        build_plan(["--algorithms", "toy-shadow", "--annotation_budget", "4", "--output_dir", str(tmp_path)])


def test_model_card_reads_the_paper_and_the_settings_from_the_method(tmp_path):
    assert key_settings("dar")[:2] == ("learning_rate", "max_steps") and key_settings("dar")[-2:] == ("use_peft", "seed")
    assert {"dar_alpha", "dar_beta", "weight_clip"} <= set(key_settings("dar"))
    assert "kl_coef" in key_settings("rloo") and "dar_alpha" not in key_settings("rloo")
    assert not set(key_settings("bon-sft")) - {f.name for f in dataclasses.fields(TrainConfig)}  # no knobs of its own
    (tmp_path / "final").mkdir()
    config = {**dataclasses.asdict(tiny_train()), **dataclasses.asdict(OnlineDPOConfig(loss_type="ipo")),
              "algorithm": "online-ipo"}
    card = write_model_card(tmp_path, config, {}).read_text()
    assert get_objective("online-ipo").paper in card and "| `loss_type` | ipo |" in card
    assert "| `oaif_num_generations` | 2 |" in card


def test_the_methods_table_of_the_docs_lists_every_registered_method_and_its_knobs():
    """docs/algorithms.md's table is written by hand: every method of the registry, and every field
    of its config, must be in it (so a new method is documented as it registers)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "algorithms.md").read_text()
    rows = {}
    for line in text.split("## The methods", 1)[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `"):
            for name in cells[0].replace("`", "").split(","):
                rows[name.strip()] = line
    for name, cls in OBJECTIVES.items():
        assert name in rows, f"docs/algorithms.md: no row for {name}"
        for f in dataclasses.fields(cls.Config) if cls.Config else ():
            assert f"`{f.name}`" in rows[name], f"docs/algorithms.md: {name}'s knob {f.name} is not in its row"
