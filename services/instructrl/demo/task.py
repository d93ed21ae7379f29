"""The demo's synthetic instruction-following task and its programmatic labeler.

Pure Python (no torch): everything here runs in the demo driver and in tests.

Prompts ask for one of four operations on a short sequence of lowercase letters
or single digits; the answer is the items separated by single spaces:

    "reverse: c a b =>"   ->  " b a c"
    "sort: 3 1 2 =>"      ->  " 1 2 3"
    "count: x y z q =>"   ->  " 4"        (the number of items)
    "copy: d e =>"        ->  " d e"

The gold score of a response (``gold_score``) is the product of

- correctness: 1.0 if the first ``n`` words equal the ``n``-word answer, else
  ``PARTIAL_CREDIT * (positions right) / n``;
- brevity: ``1 / (1 + BREVITY_PENALTY * extra)``, ``extra`` = words after the first ``n``.

So an exact answer scores 1.0, the right answer followed by one filler word 0.67,
one swapped pair of a 3-item answer 0.2.

Data for the three stages, as the InstructGPT labelers would have produced it
(Ouyang et al. 2022, sections 3.3-3.4):

- ``make_demonstrations``: the answer, except that a fraction
  (``imperfect_fraction``) of demonstrations carry one mistake of the kinds in
  ``CORRUPTIONS`` (a swapped pair, a dropped, duplicated or wrong item, or
  trailing filler words). SFT therefore imitates a policy that is usually but not
  always right, which leaves RL a measurable, honest headroom: the gold score
  is never shown to the policy, only rankings from noisy labelers.
- ``make_rankings``: K candidate responses per prompt (corruptions of the answer,
  sometimes the answer itself), ranked best first by a noisy labeler: each
  labeler ranks by ``gold + noise * N(0, 1)`` (a Thurstone model). The default
  noise makes two independent labelers agree on about 73% of pairs, the
  inter-annotator agreement InstructGPT reports (``labeler_agreement``).
- ``make_pairs``: the pairwise form (``chosen``, ``rejected``) for DPO.

Held-out prompts never appear in training data: every prompt text belongs to one
split, fixed by a hash of the text (``split_of``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import random
from collections.abc import Iterable, Sequence

from instructrl.config import field

TASKS = ("reverse", "sort", "count", "copy")
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
DIGITS = tuple("0123456789")
FILLER = ("ok", "done", "thanks")  # words a verbose labeler appends
CORRUPTIONS = ("swap", "drop", "duplicate", "wrong", "filler")
ARROW = "=>"

PARTIAL_CREDIT = 0.6  # most a wrong answer can earn (all-but-one positions right)
BREVITY_PENALTY = 0.5  # per extra word: 1 / (1 + 0.5 * extra)
EVAL_PERCENT = 10  # share of the prompt space reserved for held-out evaluation

# Thurstone noise (std of N(0,1) added to the gold score) at which two independent
# labelers agree on ~73% of pairs of the default rankings; measured with
# labeler_agreement(4000, seed=0) -> 0.731 (tests/demo/test_task.py checks 0.70-0.76).
DEFAULT_LABELER_NOISE = 0.28


@dataclasses.dataclass
class TaskConfig:
    tasks: list[str] = field(default_factory=lambda: list(TASKS), help=f"operations to ask for, from {TASKS}")
    min_items: int = field(2, help="fewest items in a prompt's sequence")
    max_items: int = field(5, help="most items in a prompt's sequence")
    imperfect_fraction: float = field(
        0.4, help="share of demonstrations with one mistake or filler word (leaves headroom for RL)")
    num_responses: int = field(4, help="K, responses ranked per prompt (2..9)")
    correct_fraction: float = field(0.3, help="chance that a ranked candidate is the exact answer")
    labeler_noise: float = field(
        DEFAULT_LABELER_NOISE, help="std of the Gaussian noise a labeler adds to the gold score before ranking "
        "(default: two labelers agree on ~73% of pairs, as in InstructGPT)")

    def validate(self) -> None:
        from instructrl.config import ConfigError

        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ConfigError(f"tasks: unknown {bad} (known: {list(TASKS)})")
        if not 1 <= self.min_items <= self.max_items <= 9:
            raise ConfigError("min_items/max_items: need 1 <= min_items <= max_items <= 9")
        if not 2 <= self.num_responses <= 9:
            raise ConfigError(f"num_responses: K must be 2..9, got {self.num_responses}")
        for name in ("imperfect_fraction", "correct_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}: must lie in [0, 1]")
        if self.labeler_noise < 0:
            raise ConfigError("labeler_noise: must be >= 0")


# ---------------------------------------------------------------- prompts and answers

def make_prompt(task: str, items: Sequence[str]) -> str:
    return f"{task}: {' '.join(items)} {ARROW}"


def parse_prompt(prompt: str) -> tuple[str, list[str]]:
    """``"sort: 3 1 2 =>"`` -> ``("sort", ["3", "1", "2"])``; ValueError if not a task prompt."""
    head, sep, rest = prompt.partition(":")
    words = rest.split()
    if not sep or head not in TASKS or not words or words[-1] != ARROW or len(words) < 2:
        raise ValueError(f"not a task prompt: {prompt!r}")
    return head, words[:-1]


def solve(task: str, items: Sequence[str]) -> list[str]:
    """The answer's words."""
    if task == "reverse":
        return list(reversed(items))
    if task == "sort":
        return sorted(items)
    if task == "count":
        return [str(len(items))]
    if task == "copy":
        return list(items)
    raise ValueError(f"unknown task {task!r}")


def render(words: Iterable[str]) -> str:
    """Response text: each word preceded by one space (``" b a c"``)."""
    return "".join(" " + w for w in words)


def answer(prompt: str) -> str:
    """The exact response for ``prompt``."""
    return render(solve(*parse_prompt(prompt)))


def gold_score(prompt: str, response: str) -> float:
    """Gold score in [0, 1]: correctness times brevity (see the module docstring)."""
    target = solve(*parse_prompt(prompt))
    words = response.split()
    n = len(target)
    right = sum(1 for i in range(min(n, len(words))) if words[i] == target[i])
    correctness = 1.0 if right == n else PARTIAL_CREDIT * right / n
    extra = max(0, len(words) - n)
    return correctness / (1.0 + BREVITY_PENALTY * extra)


def split_of(prompt: str) -> str:
    """``"eval"`` for the held-out share of prompt texts, else ``"train"`` (stable across runs)."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")
    return "eval" if h % 100 < EVAL_PERCENT else "train"


def _sample_prompt(rng: random.Random, cfg: TaskConfig) -> str:
    task = rng.choice(cfg.tasks)
    alphabet = LETTERS if rng.random() < 0.5 else DIGITS
    n = rng.randint(cfg.min_items, cfg.max_items)
    return make_prompt(task, [rng.choice(alphabet) for _ in range(n)])


def make_prompts(n: int, seed: int, cfg: TaskConfig | None = None, split: str = "train") -> list[str]:
    """``n`` prompts of one split (``"train"`` or ``"eval"``), repeats allowed."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    cfg = cfg or TaskConfig()
    rng = random.Random(f"prompts-{seed}")
    out: list[str] = []
    while len(out) < n:
        p = _sample_prompt(rng, cfg)
        if split_of(p) == split:
            out.append(p)
    return out


# ---------------------------------------------------------------- corruptions

def _alphabet_of(items: Sequence[str]) -> tuple[str, ...]:
    return DIGITS if all(i in DIGITS for i in items) else LETTERS


def _applicable(target: list[str]) -> list[str]:
    kinds = ["duplicate", "wrong", "filler"]
    if len(target) >= 2:
        kinds.append("drop")
    if len(set(target)) >= 2:
        kinds.append("swap")
    return [k for k in CORRUPTIONS if k in kinds]


def corrupt(rng: random.Random, words: list[str], kind: str) -> list[str]:
    """One mistake of ``kind`` (one of ``CORRUPTIONS``) applied to ``words``."""
    w = list(words)
    if kind == "swap":
        pairs = [(i, j) for i in range(len(w)) for j in range(i + 1, len(w)) if w[i] != w[j]]
        if pairs:
            i, j = rng.choice(pairs)
            w[i], w[j] = w[j], w[i]
    elif kind == "drop" and len(w) >= 2:
        del w[rng.randrange(len(w))]
    elif kind == "duplicate":
        i = rng.randrange(len(w))
        w.insert(i, w[i])
    elif kind == "wrong":
        i = rng.randrange(len(w))
        if w[i].isdigit() and len(w) == 1 and int(w[i]) > 1:  # a count: off by one
            w[i] = str(int(w[i]) + rng.choice((-1, 1)))
        elif w[i].isdigit() and len(w) == 1:
            w[i] = str(int(w[i]) + 1)
        else:
            w[i] = rng.choice([c for c in _alphabet_of(w) if c != w[i]])
    elif kind == "filler":
        w += [rng.choice(FILLER) for _ in range(rng.randint(1, 2))]
    elif kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}")
    return w


def _imperfect(rng: random.Random, target: list[str], mistakes: int) -> list[str]:
    kinds = [rng.choice(_applicable(target)) for _ in range(mistakes)]
    kinds.sort(key=lambda k: k == "filler")  # filler words go after the (possibly wrong) answer
    w = list(target)
    for kind in kinds:
        w = corrupt(rng, w, kind)
    return w


# ---------------------------------------------------------------- labelers and data

def labeler_rank(rng: random.Random, prompt: str, responses: Sequence[str], noise: float) -> list[int]:
    """Indices of ``responses`` best first, as one noisy labeler orders them (Thurstone model)."""
    utility = [gold_score(prompt, r) + noise * rng.gauss(0.0, 1.0) for r in responses]
    return sorted(range(len(responses)), key=lambda i: -utility[i])


def _candidates(rng: random.Random, prompt: str, k: int, cfg: TaskConfig) -> list[str]:
    target = solve(*parse_prompt(prompt))
    out: list[str] = []
    for _ in range(20 * k):
        if len(out) == k:
            break
        if rng.random() < cfg.correct_fraction:
            words = target
        else:
            words = _imperfect(rng, target, 1 if rng.random() < 0.7 else 2)
        text = render(words)
        if text not in out:
            out.append(text)
    while len(out) < k:  # a prompt with few distinct variants: allow repeats
        out.append(render(_imperfect(rng, target, 1)))
    return out


def make_demonstrations(n: int, seed: int, cfg: TaskConfig | None = None) -> list[dict]:
    """``n`` SFT records ``{"prompt", "response"}`` on train-split prompts."""
    cfg = cfg or TaskConfig()
    rng = random.Random(f"demos-{seed}")
    out = []
    for prompt in make_prompts(n, seed, cfg, "train"):
        target = solve(*parse_prompt(prompt))
        words = _imperfect(rng, target, 1) if rng.random() < cfg.imperfect_fraction else target
        out.append({"prompt": prompt, "response": render(words)})
    return out


def make_rankings(n: int, seed: int, cfg: TaskConfig | None = None, split: str = "train") -> list[dict]:
    """``n`` RM records ``{"prompt", "responses"}`` (K = ``cfg.num_responses``, best first, noisy labeler)."""
    cfg = cfg or TaskConfig()
    rng = random.Random(f"rankings-{seed}-{split}")
    out = []
    for prompt in make_prompts(n, seed + 1_000_003, cfg, split):
        cands = _candidates(rng, prompt, cfg.num_responses, cfg)
        order = labeler_rank(rng, prompt, cands, cfg.labeler_noise)
        out.append({"prompt": prompt, "responses": [cands[i] for i in order]})
    return out


def make_pairs(n: int, seed: int, cfg: TaskConfig | None = None, split: str = "train") -> list[dict]:
    """``n`` DPO records ``{"prompt", "chosen", "rejected"}``: two distinct candidates, noisy labeler."""
    cfg = cfg or TaskConfig()
    rng = random.Random(f"pairs-{seed}-{split}")
    out = []
    for prompt in make_prompts(n, seed + 2_000_003, cfg, split):
        a, b = _candidates(rng, prompt, 2, cfg)
        best, worst = labeler_rank(rng, prompt, [a, b], cfg.labeler_noise)
        out.append({"prompt": prompt, "chosen": [a, b][best], "rejected": [a, b][worst]})
    return out


def labeler_agreement(n: int, seed: int, cfg: TaskConfig | None = None, noise: float | None = None) -> float:
    """Share of response pairs that two independent noisy labelers order the same way.

    Candidates are drawn as in ``make_rankings``; InstructGPT reports 72.6 +- 1.5%
    agreement among its training labelers.
    """
    cfg = cfg or TaskConfig()
    noise = cfg.labeler_noise if noise is None else noise
    rng = random.Random(f"agreement-{seed}")
    agree = total = 0
    for prompt in make_prompts(n, seed, cfg, "train"):
        cands = _candidates(rng, prompt, cfg.num_responses, cfg)
        ranks = []
        for _ in range(2):
            order = labeler_rank(rng, prompt, cands, noise)
            ranks.append({c: pos for pos, c in enumerate(order)})
        k = len(cands)
        for i in range(k):
            for j in range(i + 1, k):
                total += 1
                agree += (ranks[0][i] < ranks[0][j]) == (ranks[1][i] < ranks[1][j])
    return agree / total


def gold_ranking_accuracy(records: Iterable[dict]) -> float:
    """Share of pairs in ranking records whose order agrees with the gold score (ties count half)."""
    right = total = 0.0
    for rec in records:
        g = [gold_score(rec["prompt"], r) for r in rec["responses"]]
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                total += 1
                right += 1.0 if g[i] > g[j] else 0.5 if g[i] == g[j] else 0.0
    return right / total if total else float("nan")


def tokenizer_corpus(cfg: TaskConfig | None = None, n: int = 2000, seed: int = 0) -> list[str]:
    """Texts covering the task's whole vocabulary, to train the demo's BPE tokenizer on."""
    cfg = cfg or TaskConfig()
    texts = [make_prompt(t, list(LETTERS)) + render(FILLER) for t in TASKS]
    texts += [make_prompt(t, list(DIGITS)) + render(str(i) for i in range(10)) for t in TASKS]
    for rec in make_demonstrations(n, seed, cfg):
        texts.append(rec["prompt"] + rec["response"])
    return texts


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> pathlib.Path:
    """Write records one JSON object a line; the file appears complete or not at all."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
