"""Reward rules for CLS-RL training and the answer judges for evaluation.

Standard library only, so the file can be copied into another project as it is. Every
rule is a small pure function; `python -m doctest rewards.py` runs the examples.

Training rewards are 0.0 or 1.0 each; METHOD_REWARDS pairs them with the methods:

    method              "accuracy" rule    "format" rule                      total
    cls-rl              accuracy_reward    format_reward                      0-2
    no-think            equality_reward    (none)                             0-1
    think-after-answer  accuracy_reward    think_after_answer_format_reward   0-2
    adaptive            accuracy_reward    adaptive_format_reward             0-2

Evaluation reads the answer with `extract_answer` and judges it with `is_correct`
(rule="paper": the authors' lenient judge; rule="strict": normalised equality).
`named_classes` lists the candidates an answer names, to count hedged answers, and
`thinks` gives Adaptive-Thinking's share of responses that think.

Known reward hacks, and which rules are immune:
- Listing several classes ("cat or dog or bird") passes any "label in answer" check: the
  paper judge and the paper's text description of the accuracy reward. Immune:
  accuracy_reward and equality_reward (both equality, as in the authors' code) and
  is_correct(rule="strict").
- An empty `<answer></answer>` passes a symmetric check ("answer in label"), because "" is
  in every string; a brand ("BMW") passes it for a full name ("BMW X5 SUV 2007"). Immune:
  every rule here; the paper judge only asks whether the label is in the answer.

Case: every comparison uses str.lower(), as the authors' code does, not str.casefold(),
so "STRASSE" does not match "Straße".
"""
import re
from dataclasses import dataclass
from typing import Callable

_THINK_THEN_ANSWER = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_ANSWER_THEN_REASON = re.compile(r"<answer>.*?</answer>\s*<reason>.*?</reason>", re.DOTALL)
# A block body holding no think/answer tag, so no tag can hide inside another block.
_BODY = r"(?:(?!</?(?:think|answer)>).)*"
_ADAPTIVE = re.compile(rf"(?:<think>{_BODY}</think>\s*)?<answer>{_BODY}</answer>", re.DOTALL)
_THINK_BLOCK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_TRAIN_ANSWER = re.compile(r"<answer>(.*?)</answer>")  # no DOTALL: one line only
_EVAL_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)


def format_reward(completion: str) -> float:
    r"""CLS-RL format reward: 1.0 iff the WHOLE completion is a think block, then an answer.

    Source: paper and authors' code agree (re.fullmatch, dot matches newlines). Nothing may
    stand before <think> or after </answer>, not even a newline. The lazy `.*?` still
    stretches over tags when that is the only way to reach the end, so repeated or nested
    blocks pass; we keep the authors' regex as it is (adaptive_format_reward does not).

    >>> format_reward("<think>It has fur.</think>\n<answer>cat</answer>")
    1.0
    >>> format_reward("<answer>cat</answer>"), format_reward("<think>a</think><answer>b</answer>\n")
    (0.0, 0.0)
    >>> format_reward("<think>a</think><answer>b</answer><answer>c</answer>")  # repeated
    1.0
    """
    return 1.0 if _THINK_THEN_ANSWER.fullmatch(completion) else 0.0


def accuracy_reward(completion: str, label: str) -> float:
    r"""CLS-RL accuracy reward: 1.0 iff the answer equals the label, ignoring case.

    Source: authors' training code. The answer is the first one-line `<answer>(.*?)</answer>`
    (no DOTALL), stripped; with none, the whole stripped completion. An answer block that
    spans lines is not found, so the whole completion, tags included, is compared and fails.
    The label is used as given. The paper's text describes a containment check; the code
    checks equality, which produced the published numbers and which we follow.

    >>> accuracy_reward("<think>fur</think><answer> Cat </answer>", "cat")
    1.0
    >>> accuracy_reward("<answer>cat or dog</answer>", "cat")  # containment would give 1.0
    0.0
    >>> accuracy_reward("<answer>\ncat\n</answer>", "cat"), accuracy_reward(" CAT\n", "cat")
    (0.0, 1.0)
    """
    match = _TRAIN_ANSWER.search(completion)
    answer = match.group(1).strip() if match else completion.strip()
    return 1.0 if answer.lower() == label.lower() else 0.0


def equality_reward(completion: str, label: str) -> float:
    r"""No-Thinking-CLS-RL reward: 1.0 iff the completion is exactly the label.

    Source: paper and authors' code agree: no stripping, case-sensitive.

    >>> equality_reward("cat", "cat"), equality_reward("Cat", "cat")
    (1.0, 0.0)
    >>> equality_reward("cat\n", "cat"), equality_reward("<answer>cat</answer>", "cat")
    (0.0, 0.0)
    """
    return 1.0 if completion == label else 0.0


def think_after_answer_format_reward(completion: str) -> float:
    r"""Think-After-Answer format reward: 1.0 iff the WHOLE completion is an answer, then a reason.

    Source: none published; inferred from the prompt ("first output the answer in <answer>
    </answer> tags and then ... <reason> </reason> tags") and written like format_reward,
    lazy `.*?` and repeated blocks included.

    >>> think_after_answer_format_reward("<answer>cat</answer>\n<reason>It has fur.</reason>")
    1.0
    >>> think_after_answer_format_reward("<reason>It has fur.</reason><answer>cat</answer>")
    0.0
    """
    return 1.0 if _ANSWER_THEN_REASON.fullmatch(completion) else 0.0


def adaptive_format_reward(completion: str) -> float:
    r"""Adaptive-Thinking format reward: 1.0 iff the WHOLE completion is one of the prompt's
    two cases: `<answer>...</answer>` or `<think>...</think> <answer>...</answer>`.

    Source: the paper (later version) and its prompt; no code was published. With the lazy
    `.*?` of format_reward, case (1) would accept anything from <answer> to </answer>, e.g.
    answer, think, answer. So here a block may not hold a <think> or <answer> tag (open or
    close): repeated, nested or reordered blocks fail.

    >>> adaptive_format_reward("<answer>cat</answer>")
    1.0
    >>> adaptive_format_reward("<think>It has fur.</think> <answer>cat</answer>")
    1.0
    >>> adaptive_format_reward("<answer>a</answer><answer>b</answer>")
    0.0
    """
    return 1.0 if _ADAPTIVE.fullmatch(completion) else 0.0


@dataclass(frozen=True)
class RewardRule:
    """One term of a method's reward: weight * fn(completion[, label]), logged as `name`."""
    name: str
    fn: Callable[..., float]
    weight: float
    uses_label: bool


_ACCURACY = RewardRule("accuracy", accuracy_reward, 1.0, uses_label=True)
METHOD_REWARDS: dict[str, tuple[RewardRule, ...]] = {
    "cls-rl": (_ACCURACY, RewardRule("format", format_reward, 1.0, uses_label=False)),
    "no-think": (RewardRule("accuracy", equality_reward, 1.0, uses_label=True),),
    "think-after-answer": (
        _ACCURACY, RewardRule("format", think_after_answer_format_reward, 1.0, uses_label=False)),
    "adaptive": (_ACCURACY, RewardRule("format", adaptive_format_reward, 1.0, uses_label=False))}


def _rules(method: str) -> tuple[RewardRule, ...]:
    if method not in METHOD_REWARDS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHOD_REWARDS)}")
    return METHOD_REWARDS[method]


def reward_components(method: str, completion: str, label: str) -> dict[str, float]:
    """The unweighted value of each of `method`'s reward rules, by rule name.

    >>> reward_components("cls-rl", "<think>fur</think><answer>cat</answer>", "dog")
    {'accuracy': 0.0, 'format': 1.0}
    >>> reward_components("no-think", "cat", "cat")
    {'accuracy': 1.0}
    """
    return {rule.name: rule.fn(completion, label) if rule.uses_label else rule.fn(completion)
            for rule in _rules(method)}


def total_reward(method: str, components: dict[str, float]) -> float:
    """The weighted sum of `components` (from reward_components) for `method`.

    >>> total_reward("cls-rl", {"accuracy": 1.0, "format": 1.0})
    2.0
    """
    return float(sum(rule.weight * components[rule.name] for rule in _rules(method)))


def thinks(completion: str) -> bool:
    r"""Whether the completion holds a closed think block (dot matches newlines), anywhere.

    >>> thinks("<think>\nIt has fur.\n</think><answer>cat</answer>")
    True
    >>> thinks("<answer>cat</answer>"), thinks("<think>unclosed")
    (False, False)
    """
    return _THINK_BLOCK.search(completion) is not None


def think_text(completion: str) -> str:
    """The text inside the completion's closed think blocks, joined by spaces.

    >>> think_text("<think>fur</think> and <think>whiskers</think><answer>cat</answer>")
    'fur whiskers'
    """
    return " ".join(_THINK_BLOCK.findall(completion))


def extract_answer(completion: str) -> str:
    r"""The evaluation answer: the first `<answer>\s*(.*?)\s*</answer>` (dot matches
    newlines), else the whole stripped completion. Source: authors' evaluation code.

    >>> extract_answer("<think>fur</think><answer>\n golden\nretriever \n</answer>")
    'golden\nretriever'
    >>> extract_answer("<answer>cat</answer><answer>dog</answer>"), extract_answer(" A cat.\n")
    ('cat', 'A cat.')
    """
    match = _EVAL_ANSWER.search(completion)
    return match.group(1) if match else completion.strip()


def _normalise(text: str) -> str:
    """Lowercase, `_` as space, runs of whitespace as one space, stripped."""
    return " ".join(text.lower().replace("_", " ").split())


def _label_in_answer(answer: str, label: str) -> bool:
    return answer.lower() == label.lower() or label.lower() in answer.lower()


def is_correct(completion: str, label: str, rule: str = "paper") -> bool:
    """Judge a completion against its label; the answer is extract_answer(completion).

    rule="paper" (authors' evaluation code): correct if the lowercased label equals or is
    contained in the lowercased answer; if not, the same check with `_` read as a space in
    both. Lenient: "cat or dog" passes for "dog", "polka-dotted" for "dotted", even
    "concatenate" for "cat" (see named_classes to count such answers).
    rule="strict": the answer equals the label once both are normalised (lowercase, `_` as
    space, runs of whitespace collapsed, stripped, then ONE trailing period dropped).

    >>> hedged = "<answer>cat or dog</answer>"
    >>> is_correct(hedged, "dog"), is_correct(hedged, "dog", rule="strict")
    (True, False)
    >>> is_correct("<answer>Golden  Retriever.</answer>", "golden_retriever", rule="strict")
    True
    """
    answer = extract_answer(completion)
    if rule == "paper":
        return (_label_in_answer(answer, label)
                or _label_in_answer(answer.replace("_", " "), label.replace("_", " ")))
    if rule == "strict":
        answer, label = _normalise(answer), _normalise(label)
        return answer.removesuffix(".") == label.removesuffix(".")
    raise ValueError(f"unknown rule {rule!r}; expected 'paper' or 'strict'")


def named_classes(answer: str, candidates: list[str]) -> list[str]:
    """The candidates that `answer` names, in order of first mention, each once, spelled
    as in `candidates`.

    Case-insensitive, `_` read as a space, whitespace runs as one space, and a name must not
    touch a letter or digit on either side ("cat" is not in "concatenate"; any script). A
    mention lying wholly inside a longer named candidate does not count on its own:
    "polka-dotted" names only "polka-dotted", and "bmw x5" names "bmw x5" if that is a
    candidate, else "bmw". Partly overlapping mentions both count. Empty names are skipped.

    >>> named_classes("A tabby cat, or maybe a dog.", ["dog", "cat", "concatenate"])
    ['cat', 'dog']
    >>> named_classes("polka-dotted", ["dotted", "polka-dotted"])
    ['polka-dotted']
    """
    text = _normalise(answer)
    mentions = []  # (start, end, candidate)
    for name in dict.fromkeys(candidates):
        if key := _normalise(name):
            pattern = rf"(?<!\w){re.escape(key)}(?!\w)"
            mentions += [(m.start(), m.end(), name) for m in re.finditer(pattern, text)]

    def inside_longer(start: int, end: int) -> bool:
        return any(s <= start and end <= e and e - s > end - start for s, e, _ in mentions)

    named = [name for start, end, name in sorted(mentions) if not inside_longer(start, end)]
    return list(dict.fromkeys(named))
