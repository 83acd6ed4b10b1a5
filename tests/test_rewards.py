"""The reward rules and answer judges, case by case. Every expected value is written by
hand from the rules in docs/method.md sections 4 and 6, never computed by the code under test."""
import ast
import dataclasses
import doctest
import sys
from pathlib import Path

import pytest

import rewards
from rewards import (
    METHOD_REWARDS, accuracy_reward, adaptive_format_reward, equality_reward,
    extract_answer, format_reward, is_correct, named_classes, reward_components,
    think_after_answer_format_reward, thinks, total_reward,
)

P = pytest.param

FORMAT_CASES = [
    P("<think>It has fur.</think><answer>cat</answer>", 1.0, id="think-then-answer"),
    P("<think>fur</think> \n <answer>cat</answer>", 1.0, id="whitespace-between-blocks"),
    P("<think>a\nb</think>\n<answer>golden\nretriever</answer>", 1.0, id="multi-line-blocks"),
    P("<think></think><answer></answer>", 1.0, id="empty-blocks"),
    P("<answer>cat</answer>", 0.0, id="answer-only"),
    P("<think>fur</think>", 0.0, id="think-only"),
    P("Sure. <think>fur</think><answer>cat</answer>", 0.0, id="text-before-think"),
    P(" <think>fur</think><answer>cat</answer>", 0.0, id="space-before-think"),
    P("<think>fur</think><answer>cat</answer> Done.", 0.0, id="text-after-answer"),
    P("<think>fur</think><answer>cat</answer>\n", 0.0, id="newline-after-answer"),
    P("<answer>cat</answer><think>fur</think>", 0.0, id="answer-before-think"),
    P("<think>fur</think><answer>cat", 0.0, id="unclosed-answer"),
    P("<THINK>fur</THINK><ANSWER>cat</ANSWER>", 0.0, id="uppercase-tags"),
    P("", 0.0, id="empty-completion"),
    # The authors' lazy regex still spans tags when that is the only way to the end.
    P("<think>a</think><answer>b</answer><answer>c</answer>", 1.0, id="repeated-answer-passes"),
    P("<think>a</think><think>b</think><answer>c</answer>", 1.0, id="repeated-think-passes"),
    P("<think><answer>cat</answer></think><answer>cat</answer>", 1.0, id="nested-answer-passes"),
]


@pytest.mark.parametrize("completion, expected", FORMAT_CASES)
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected


ACCURACY_CASES = [
    P("<think>fur</think><answer>cat</answer>", "cat", 1.0, id="exact"),
    P("<answer>  Golden Retriever </answer>", "golden retriever", 1.0, id="case-and-spaces"),
    P("cat", "cat", 1.0, id="bare-label-no-tags"),
    P("\n Cat \n", "cat", 1.0, id="bare-label-stripped"),
    P("I think <answer>cat</answer> for sure", "cat", 1.0, id="text-around-tags"),
    P("<think><answer>cat</answer></think>", "cat", 1.0, id="answer-only-inside-think"),
    P("<answer>dog</answer>", "cat", 0.0, id="wrong-label"),
    P("<answer>cat or dog</answer>", "cat", 0.0, id="two-classes"),
    P("<answer>cat or dog or bird</answer>", "bird", 0.0, id="three-classes"),
    P("<answer>polka-dotted</answer>", "dotted", 0.0, id="label-inside-longer-answer"),
    P("<answer>cat.</answer>", "cat", 0.0, id="trailing-period"),
    P("<answer></answer>", "cat", 0.0, id="empty-tags"),
    P("<answer> </answer>", "cat", 0.0, id="space-tags"),
    P("<answer>\ncat\n</answer>", "cat", 0.0, id="multi-line-block-not-found"),
    P("<answer>\ndog</answer> <answer>cat</answer>", "cat", 1.0, id="next-one-line-block-used"),
    P("<answer>cat</answer><answer>dog</answer>", "cat", 1.0, id="first-block-wins"),
    P("<answer>cat</answer><answer>dog</answer>", "dog", 0.0, id="second-block-ignored"),
    P("<answer>golden retriever</answer>", "golden_retriever", 0.0, id="underscore-not-mapped"),
    P("<answer>CRÈME BRÛLÉE</answer>", "crème brûlée", 1.0, id="non-ascii-case"),
    P("<answer>ĆEVAPI</answer>", "Ćevapi", 1.0, id="non-ascii-capital"),
    P("<answer>STRASSE</answer>", "Straße", 0.0, id="lower-not-casefold"),
    P("<answer>f-16a/b</answer>", "F-16A/B", 1.0, id="metachar-label"),
    P("<answer>C++ (lang)</answer>", "c++ (lang)", 1.0, id="metachar-parens"),
    P("<answer>c</answer>", "c++ (lang)", 0.0, id="metachar-prefix"),
    P("", "cat", 0.0, id="empty-completion"),
]


@pytest.mark.parametrize("completion, label, expected", ACCURACY_CASES)
def test_accuracy_reward(completion, label, expected):
    assert accuracy_reward(completion, label) == expected


EQUALITY_CASES = [
    P("cat", "cat", 1.0, id="exact"),
    P("cat\n", "cat", 0.0, id="trailing-newline"),
    P(" cat", "cat", 0.0, id="leading-space"),
    P("Cat", "cat", 0.0, id="case"),
    P("cat.", "cat", 0.0, id="trailing-period"),
    P("<answer>cat</answer>", "cat", 0.0, id="in-tags"),
    P("cat or dog", "cat", 0.0, id="two-classes"),
    P("golden retriever", "golden_retriever", 0.0, id="underscore"),
    P("crème brûlée", "crème brûlée", 1.0, id="non-ascii"),
    P("F-16A/B", "F-16A/B", 1.0, id="metachar"),
    P("", "cat", 0.0, id="empty-completion"),
]


@pytest.mark.parametrize("completion, label, expected", EQUALITY_CASES)
def test_equality_reward(completion, label, expected):
    assert equality_reward(completion, label) == expected


THINK_AFTER_ANSWER_CASES = [
    P("<answer>cat</answer><reason>It has fur.</reason>", 1.0, id="answer-then-reason"),
    P("<answer>cat</answer>\n<reason>a\nb</reason>", 1.0, id="multi-line-reason"),
    P("<reason>fur</reason><answer>cat</answer>", 0.0, id="reason-first"),
    P("<answer>cat</answer>", 0.0, id="answer-only"),
    P("<answer>cat</answer><think>fur</think>", 0.0, id="think-not-reason"),
    P("<think>fur</think><answer>cat</answer>", 0.0, id="cls-rl-shape"),
    P("So: <answer>cat</answer><reason>fur</reason>", 0.0, id="text-before"),
    P("<answer>cat</answer><reason>fur</reason>\n", 0.0, id="newline-after"),
    P("", 0.0, id="empty-completion"),
    P("<answer>a</answer><answer>b</answer><reason>r</reason>", 1.0, id="repeated-answer-passes"),
]


@pytest.mark.parametrize("completion, expected", THINK_AFTER_ANSWER_CASES)
def test_think_after_answer_format_reward(completion, expected):
    assert think_after_answer_format_reward(completion) == expected


ADAPTIVE_CASES = [
    P("<answer>cat</answer>", 1.0, id="answer-only"),
    P("<think>fur</think><answer>cat</answer>", 1.0, id="think-then-answer"),
    P("<think>fur</think> <answer>cat</answer>", 1.0, id="space-between"),
    P("<think>a\nb</think>\n<answer>golden\nretriever</answer>", 1.0, id="multi-line"),
    P("<answer></answer>", 1.0, id="empty-answer-is-well-formed"),
    P("<answer>cat <reason>fur</reason></answer>", 1.0, id="other-tags-inside-allowed"),
    P("<think>fur</think>", 0.0, id="think-only"),
    P("<answer>cat</answer><think>fur</think>", 0.0, id="think-after-answer"),
    P("<answer>a</answer><answer>b</answer>", 0.0, id="repeated-answer"),
    P("<answer>a</answer><think>b</think><answer>c</answer>", 0.0, id="answer-think-answer"),
    P("<think>a</think><think>b</think><answer>c</answer>", 0.0, id="repeated-think"),
    P("<think><answer>a</answer></think><answer>a</answer>", 0.0, id="answer-nested-in-think"),
    P("<answer>a <think>b</think></answer>", 0.0, id="think-nested-in-answer"),
    P("<answer>a</think></answer>", 0.0, id="stray-close-tag"),
    P("Hi <answer>cat</answer>", 0.0, id="text-before"),
    P("<answer>cat</answer>\n", 0.0, id="newline-after"),
    P("<answer>cat", 0.0, id="unclosed"),
    P("cat", 0.0, id="bare-label"),
    P("", 0.0, id="empty-completion"),
]


@pytest.mark.parametrize("completion, expected", ADAPTIVE_CASES)
def test_adaptive_format_reward(completion, expected):
    assert adaptive_format_reward(completion) == expected


THINKS_CASES = [
    P("<think>fur</think><answer>cat</answer>", True, id="think-block"),
    P("<think>\na\nb\n</think>", True, id="multi-line"),
    P("<think></think><answer>cat</answer>", True, id="empty-think-block"),
    P("Well <think>fur</think> so cat", True, id="think-mid-text"),
    P("<answer>cat</answer>", False, id="answer-only"),
    P("<think>fur, so cat", False, id="unclosed"),
    P("<THINK>fur</THINK>", False, id="uppercase"),
    P("", False, id="empty-completion"),
]


@pytest.mark.parametrize("completion, expected", THINKS_CASES)
def test_thinks(completion, expected):
    assert thinks(completion) is expected


EXTRACT_CASES = [
    P("<think>fur</think><answer>cat</answer>", "cat", id="tags"),
    P("<answer> \n cat \n </answer>", "cat", id="whitespace-inside-stripped"),
    P("<answer>\ngolden\nretriever\n</answer>", "golden\nretriever", id="multi-line"),
    P("<answer>cat</answer><answer>dog</answer>", "cat", id="first-block"),
    P("<think><answer>cat</answer></think>", "cat", id="answer-only-inside-think"),
    P("  A cat.\n", "A cat.", id="no-tags-whole-stripped"),
    P("<answer></answer>", "", id="empty-tags"),
    P("<answer> </answer>", "", id="space-tags"),
    P("<answer>cat", "<answer>cat", id="unclosed"),
    P("", "", id="empty-completion"),
]


@pytest.mark.parametrize("completion, expected", EXTRACT_CASES)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


# (completion, label, paper judge, strict judge)
JUDGE_CASES = [
    P("<answer>cat</answer>", "cat", True, True, id="exact"),
    P("<answer>CAT</answer>", "cat", True, True, id="case"),
    P("<answer>Golden Retriever</answer>", "golden_retriever", True, True, id="underscore-label"),
    P("<answer>golden_retriever</answer>", "Golden Retriever", True, True, id="underscore-answer"),
    P("<answer>golden   retriever</answer>", "golden retriever", False, True, id="space-run"),
    P("<answer>cat.</answer>", "cat", True, True, id="trailing-period"),
    P("<answer>cat..</answer>", "cat", True, False, id="two-periods"),
    P("<answer>cat or dog</answer>", "dog", True, False, id="two-classes"),
    P("<answer>cat or dog or bird</answer>", "bird", True, False, id="three-classes"),
    P("<answer>polka-dotted</answer>", "dotted", True, False, id="label-inside-longer-name"),
    P("<answer>dotted</answer>", "polka-dotted", False, False, id="answer-inside-label"),
    P("<answer>BMW</answer>", "BMW X5 SUV 2007", False, False, id="brand-for-model"),
    P("<answer>concatenate</answer>", "cat", True, False, id="label-inside-a-word"),
    P("The photo shows a cat.", "cat", True, False, id="sentence-no-tags"),
    P("<answer></answer>", "cat", False, False, id="empty-tags"),
    P("<answer> </answer>", "cat", False, False, id="space-tags"),
    P("<think><answer>cat</answer></think>", "cat", True, True, id="answer-only-inside-think"),
    P("<answer>\ncat\n</answer>", "cat", True, True, id="multi-line-one-word"),
    P("<answer>golden\nretriever</answer>", "golden retriever", False, True, id="line-break"),
    P("<answer>cat</answer><answer>dog</answer>", "dog", False, False, id="second-block-ignored"),
    P("<answer>Crème Brûlée</answer>", "crème brûlée", True, True, id="non-ascii"),
    P("<answer>ĆEVAPI</answer>", "Ćevapi", True, True, id="non-ascii-capital"),
    P("<answer>F-16A/B</answer>", "F-16A/B", True, True, id="metachar"),
    P("<answer>c++ (lang)</answer>", "C++ (lang)", True, True, id="metachar-parens"),
    P("", "cat", False, False, id="empty-completion"),
]


@pytest.mark.parametrize("completion, label, paper, strict", JUDGE_CASES)
def test_is_correct(completion, label, paper, strict):
    assert is_correct(completion, label) is paper
    assert is_correct(completion, label, rule="paper") is paper
    assert is_correct(completion, label, rule="strict") is strict


def test_is_correct_rejects_unknown_rule():
    with pytest.raises(ValueError, match=r"'lenient'.*'paper'.*'strict'"):
        is_correct("<answer>cat</answer>", "cat", rule="lenient")


NAMED_CASES = [
    P("cat", ["dog", "cat"], ["cat"], id="one"),
    P("a dog or a cat", ["cat", "dog"], ["dog", "cat"], id="answer-order"),
    P("A or B or C", ["c", "b", "a"], ["a", "b", "c"], id="three-classes"),
    P("concatenate", ["cat"], [], id="word-boundary-after"),
    P("a bobcat", ["cat"], [], id="word-boundary-before"),
    P("CAT", ["Cat"], ["Cat"], id="case-spelled-as-candidate"),
    P("golden   Retriever", ["golden_retriever"], ["golden_retriever"], id="underscore-and-spaces"),
    P("golden_retriever", ["golden retriever"], ["golden retriever"], id="underscore-in-answer"),
    P("polka-dotted", ["dotted", "polka-dotted"], ["polka-dotted"], id="inside-longer-name"),
    P("dotted or polka-dotted", ["polka-dotted", "dotted"], ["dotted", "polka-dotted"],
      id="also-on-its-own"),
    P("bmw x5", ["bmw", "bmw x5"], ["bmw x5"], id="model-absorbs-brand"),
    P("bmw x5", ["bmw"], ["bmw"], id="brand-alone"),
    P("red wine bar", ["wine bar", "red wine"], ["red wine", "wine bar"], id="partial-overlap"),
    P("cat, cat, dog, cat", ["dog", "cat"], ["cat", "dog"], id="each-once"),
    P("crème brûlée, not ćevapi", ["Ćevapi", "crème brûlée"], ["crème brûlée", "Ćevapi"],
      id="non-ascii"),
    P("crèmes", ["crème"], [], id="non-ascii-word-boundary"),
    P("F-16A/B", ["F-16", "F-16A/B"], ["F-16A/B"], id="metachar"),
    P("F-16A", ["F-16"], [], id="digit-then-letter"),
    P("it is c++ (lang).", ["c++ (lang)", "c"], ["c++ (lang)"], id="metachar-parens"),
    P("", ["cat"], [], id="empty-answer"),
    P("cat", ["", "  ", "cat"], ["cat"], id="empty-candidate-skipped"),
]


@pytest.mark.parametrize("answer, candidates, expected", NAMED_CASES)
def test_named_classes(answer, candidates, expected):
    assert named_classes(answer, candidates) == expected


# Per method, the expected rules: name -> (function, weight).
EXPECTED_TABLE = {
    "cls-rl": {"accuracy": (accuracy_reward, 1.0), "format": (format_reward, 1.0)},
    "no-think": {"accuracy": (equality_reward, 1.0)},
    "think-after-answer": {"accuracy": (accuracy_reward, 1.0),
                           "format": (think_after_answer_format_reward, 1.0)},
    "adaptive": {"accuracy": (accuracy_reward, 1.0), "format": (adaptive_format_reward, 1.0)},
}


def test_method_table_pairs_methods_with_rules():
    assert tuple(METHOD_REWARDS) == ("cls-rl", "no-think", "think-after-answer", "adaptive")
    for method, rules in METHOD_REWARDS.items():
        assert {r.name: (r.fn, r.weight) for r in rules} == EXPECTED_TABLE[method], method
        assert len({r.name for r in rules}) == len(rules), method
        assert all(r.uses_label == (r.name == "accuracy") for r in rules), method
    with pytest.raises(dataclasses.FrozenInstanceError):
        METHOD_REWARDS["cls-rl"][0].weight = 2.0


GOOD = "<think>It has fur.</think> <answer>cat</answer>"
REWARD_CASES = [
    P("cls-rl", GOOD, "cat", {"accuracy": 1.0, "format": 1.0}, 2.0, id="cls-rl-perfect"),
    P("cls-rl", GOOD, "dog", {"accuracy": 0.0, "format": 1.0}, 1.0, id="cls-rl-wrong-label"),
    P("cls-rl", "cat", "cat", {"accuracy": 1.0, "format": 0.0}, 1.0, id="cls-rl-bare-label"),
    P("cls-rl", "<answer>cat or dog</answer>", "cat", {"accuracy": 0.0, "format": 0.0}, 0.0,
      id="cls-rl-hedge"),
    P("no-think", "cat", "cat", {"accuracy": 1.0}, 1.0, id="no-think-exact"),
    P("no-think", "<answer>cat</answer>", "cat", {"accuracy": 0.0}, 0.0, id="no-think-tags"),
    P("think-after-answer", "<answer>cat</answer>\n<reason>fur</reason>", "cat",
      {"accuracy": 1.0, "format": 1.0}, 2.0, id="taa-perfect"),
    P("think-after-answer", GOOD, "cat", {"accuracy": 1.0, "format": 0.0}, 1.0,
      id="taa-think-shape"),
    P("adaptive", "<answer>cat</answer>", "cat", {"accuracy": 1.0, "format": 1.0}, 2.0,
      id="adaptive-direct"),
    P("adaptive", GOOD, "cat", {"accuracy": 1.0, "format": 1.0}, 2.0, id="adaptive-thinking"),
    P("adaptive", "<answer>cat</answer><answer>dog</answer>", "cat",
      {"accuracy": 1.0, "format": 0.0}, 1.0, id="adaptive-repeated"),
]


@pytest.mark.parametrize("method, completion, label, components, total", REWARD_CASES)
def test_reward_components_and_total(method, completion, label, components, total):
    assert reward_components(method, completion, label) == components
    assert total_reward(method, components) == total


def test_unknown_method_lists_valid_methods():
    for call in (lambda: reward_components("ppo", "cat", "cat"),
                 lambda: total_reward("ppo", {"accuracy": 1.0})):
        with pytest.raises(ValueError, match="'ppo'.*cls-rl, no-think, think-after-answer"):
            call()


def test_total_reward_names_missing_component():
    with pytest.raises(KeyError, match="format"):
        total_reward("cls-rl", {"accuracy": 1.0})


def test_docstring_examples():
    result = doctest.testmod(rewards)
    assert result.failed == 0 and result.attempted >= 20


def test_depends_only_on_the_standard_library():
    tree = ast.parse(Path(rewards.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert imported <= sys.stdlib_module_names, imported - sys.stdlib_module_names
