"""Answer grading: SQuAD EM/F1, the offline answer-equivalence grader, and the registry of graders.

SEAL grades a model's answer with GPT-4.1 asked whether the answer conveys the gold answer without
contradicting it. Offline we reproduce that verdict with :func:`grade`, a deterministic rule-based grader
(about 0.1 ms per answer, never raises), and with :class:`~seal_jax.selfedit.judge.JudgeGrader`, the same
yes/no question put to a local model through the ``LM`` facade (for Qwen3-8B-sized runs). The calibration
file, its split and the agreement report are in :mod:`~seal_jax.selfedit.calibration`.

Rule families of :func:`grade` (each has unit cases in ``tests/test_grading.py``); :func:`rule_verdict`
gives the same decision in three ways (yes, definite no, undecided):

* **Canonical tokens** — accents folded, ``n't`` → ``not``, punctuation split, articles dropped, light
  plural stemming; numbers merged into digits ("ten million" = "10,000,000", "nineteenth" = "19th" = "19",
  "2.4%" = "2.4 percent"); currency signs and a few unit spellings unified.
* **Run-on and refusal** — an answer that runs on into a new ``Q:``/``Question:``/``Passage:`` block is a
  no (GPT-4.1 rejects those even when the first line is right); a trailing leaked system prompt ("You are
  an AI assistant…") or ``A:`` block is cut off; "not mentioned in the text", "I don't know" … are a no.
* **Containment with fuzzy words** — the gold (or one of the alternatives it spells out: "X (Y)", "X or Y",
  "a, b and/or c", a name without its middle initial) appears as a run of tokens, or enough of its
  *informative* words do: stop words, titles (General, Rep., Khan …), hedges/degree words and words the
  question already contains do not count. Words match exactly, by a shared long prefix
  (revolution/revolutionary) or one edit apart (Tengis/Tenggis). Up to three informative words must all be
  there; from four on, 60 % suffice.
* **Enumerations** — "X, Y and Z": every item must be there, an item counting when half of its own words
  (and all its numbers) are.
* **List markers** — "1." or "-" opening a line is not a number or a word of the answer.
* **Numbers and dates** — a number in the gold must appear as that number (380 ≠ 480, 2.4 % ≠ 2.5 %); a
  year conveys a full date ("1508" for "9 March 1508") unless another month is named; a decade ("late
  1970s") is conveyed by a year inside it.
* **Partial answers** — a one-word answer that is part of a short gold ("P" for "complexity class P",
  "1508" for "9 March 1508") is accepted, not one word of a longer gold or of a conjunction.
* **Contradiction and hedging** — a negation right before the answer ("not caused by bad air") or right
  after it through an auxiliary ("Bernini is not represented"); the opposite of a gold word instead of it
  ("weak" for "strong", "south" for "north"); a single gold number offered as one end of a range or as
  one of two options ("75,000 to 150,000", "1963 or 1964"); "either X or Y".
* **Yes/no questions** — compare the polarity of the gold with the answer's opening yes/no.

Calibration (:mod:`~seal_jax.selfedit.calibration`): the rules were written looking only at the tune half
of the calibration file; the held-out half is used only to report. With seed 0 (1,556 tune / 1,558
held-out rows):

=================  =========  =========  ======  =====
held-out           agreement  precision  recall  kappa
=================  =========  =========  ======  =====
``grade``          0.875      0.898      0.773   0.733
``contains_gold``  0.857      0.952      0.672   0.685
=================  =========  =========  ======  =====

(in-sample on the tune half: 0.909 / 0.935 / 0.813 / 0.800 against the baseline's 0.850 / 0.924 / 0.651 /
0.659). The issue's bar of 0.90 held-out agreement is **not** reached. Most remaining disagreements are
paraphrases that share no word with the gold ("divided" for "fragmentation", "more difficult" for
"harder"), which a lexical grader cannot see; the LLM judge is the tool for those.

Why there is no embedding-based paraphrase check: :func:`rule_verdict` leaves 790 of the 1,556 tune rows
undecided (the gold's words are not in the answer); GPT-4.1 accepted 95 of them. Cosine similarities
from all-MiniLM-L6-v2 (:mod:`seal_jax.selfedit.embeddings`) between the gold, or question + gold, and
the answer, its first sentence, its sentences or its clauses rank the accepted rows only weakly above
the rejected ones (ROC AUC 0.60-0.73), and at every threshold the top of the ranking holds more
rejected rows than accepted ones: the best threshold on the tune half itself gains nothing, and a
logistic regression over all those features (plus SQuAD F1 and answer length), 5-fold cross-validated
by question, turns more rows wrong than right at every cut-off. The same holds for vetoing the rules'
yes (best in-sample gain +2 rows of 1,556). The highest similarities belong to near misses of the right
type, which GPT-4.1 rejects: "WFTS-TV and WTVT-TV" for "WFTS-TV and WWSB", "Easier" for "harder" (cosine
0.84), "Apollo spacesuits" for "new Apollo spacesuit". A bi-encoder measures topic, not entailment.
Reproduce with ``python experiments/grader_embedding_study.py`` (tune half only; the held-out half was
not used for this). A causal LM reads the pair instead of embedding each side, but the bundled
SmolLM2-135M-Instruct does no better: how much reading the answer raises its probability of the gold
(PMI) ranks the undecided rows GPT-4.1 accepted above the rest with ROC AUC 0.59 (0.61 per gold token),
and no threshold gains a row (``python experiments/grader_lm_study.py``, tune half only); as a zero-shot
judge it adds nothing either (``seal-jax calibrate --grader rules+judge``). :func:`rule_verdict`'s undecided rows are where a costlier check (an LLM judge)
would have to look; the rules' definite answers need no second opinion. The ``rules+judge`` grader
(:mod:`~seal_jax.selfedit.judge`) does exactly that.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable

__all__ = [
    "GRADERS",
    "JUDGE_GRADERS",
    "contains_gold",
    "exact_match",
    "f1_score",
    "get_grader",
    "grade",
    "normalize_answer",
    "rule_verdict",
]

Grader = Callable[[str, str, str], bool]

# ----------------------------------------------------------------------------------------------------
# SQuAD v1.1 metrics

_PUNCT = frozenset(string.punctuation)


def normalize_answer(text: object) -> str:
    """SQuAD v1.1 normalisation: lower case, drop ASCII punctuation and the articles a/an/the, squeeze spaces.

    ``None`` counts as the empty string; anything else is passed through ``str``.
    """
    s = "" if text is None else str(text)
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(gold: object, prediction: object) -> bool:
    """SQuAD exact match: the normalised gold and prediction are equal strings."""
    return normalize_answer(gold) == normalize_answer(prediction)


def f1_score(gold: object, prediction: object) -> float:
    """SQuAD v1.1 token F1 between the normalised gold and prediction (bags of tokens with multiplicity).

    When either side normalises to no tokens the score is 1.0 if both are empty, else 0.0.
    """
    g = normalize_answer(gold).split()
    p = normalize_answer(prediction).split()
    if not g or not p:
        return float(g == p)
    same = sum((Counter(g) & Counter(p)).values())
    if same == 0:
        return 0.0
    precision = same / len(p)
    recall = same / len(g)
    return 2 * precision * recall / (precision + recall)


def contains_gold(question: str, gold: str, prediction: str) -> bool:
    """The baseline grader: the normalised gold is a substring of the normalised prediction.

    ``question`` is ignored (it is there so that every grader has the same signature); an empty gold is a no.
    """
    g = normalize_answer(gold)
    return bool(g) and g in normalize_answer(prediction)


# ----------------------------------------------------------------------------------------------------
# Canonical tokens for the offline grader

_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30,
    "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
}
_ORDINAL_WORDS = {
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8,
    "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12, "thirteenth": 13, "fourteenth": 14,
    "fifteenth": 15, "sixteenth": 16, "seventeenth": 17, "eighteenth": 18, "nineteenth": 19,
    "twentieth": 20, "thirtieth": 30, "fortieth": 40, "fiftieth": 50, "hundredth": 100,
}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9, "trillion": 10**12}
_UNIT_WORDS = {
    "percent": "percent", "pct": "percent", "dollars": "dollar", "usd": "dollar", "euros": "euro",
    "eur": "euro", "pounds": "pound", "gbp": "pound", "km": "kilometer", "kilometres": "kilometer",
    "kilometre": "kilometer", "kilometers": "kilometer", "metres": "meter", "metre": "meter",
    "meters": "meter", "miles": "mile", "mi": "mile", "ft": "foot", "feet": "foot", "kg": "kilogram",
    "kilograms": "kilogram", "kilos": "kilogram", "lbs": "pound", "lb": "pound", "mph": "mile per hour",
    "yrs": "year", "yr": "year", "celsius": "degree celsius", "fahrenheit": "degree fahrenheit",
}
_ORDINAL_SUFFIX = re.compile(r"^(\d+)(st|nd|rd|th)$")
_PLURAL_NUMBER = re.compile(r"^(\d+)s$")
_DECIMAL = re.compile(r"^\d+\.\d+$")
_MAX_NUMBER = 1e18  # number words beyond this are left as words (no float overflow on garbage)

_STOPWORDS = frozenset(
    """a an the of in on at to for from by with and or as is are was were be been being it its this that
    these those their there they he she his her him them which who whom whose what when where why how
    do does did has have had not no so than then also into onto about over under up out s
    i we you your our my me us will would can could should may might must shall""".split()
)


def _fold(text: str) -> str:
    """Lower case, strip accents, spell out ``n't`` and currency signs."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = re.sub(r"n['\u2019]t\b", " not", text.lower())
    text = text.replace("&", " and ").replace("$", " dollar ").replace("\u20ac", " euro ")
    text = text.replace("\u00a3", " pound ").replace("per cent", "percent")
    return text


def _stem(tok: str) -> str:
    """A very light suffix stripper so that plural forms meet (numbers are left alone)."""
    if len(tok) <= 3 or tok[0].isdigit():
        return tok
    for suf, rep in (("ies", "y"), ("sses", "ss"), ("es", "e"), ("s", "")):
        if tok.endswith(suf) and not tok.endswith("ss") and len(tok) - len(suf) >= 3:
            return tok[: len(tok) - len(suf)] + rep
    return tok


def _can_add(prev: str, value: int) -> bool:
    """May the number word worth ``value`` extend a number whose last word is ``prev``?"""
    if prev in _SCALES or prev == "and":
        return 0 < value < 100
    return prev in _UNITS and _UNITS[prev] >= 20 and _UNITS[prev] % 10 == 0 and 0 < value < 10


def _number_token(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def _merge_numbers(words: list[str]) -> list[str]:
    """Turn runs of number words and digits ("ten million", "1.5 billion", "19th", "1970s") into one token."""
    out: list[str] = []
    i, n = 0, len(words)
    while i < n:
        w = words[i]
        m = _PLURAL_NUMBER.match(w)
        if m:  # "1970s" stays a decade; "747s" is just 747
            digits = m.group(1)
            out.append(w if len(digits) == 4 and digits.endswith("0") else str(int(digits)))
            i += 1
            continue
        m = _ORDINAL_SUFFIX.match(w)
        if m:
            out.append(str(int(m.group(1))))
            i += 1
            continue
        if w in _ORDINAL_WORDS:
            out.append(str(_ORDINAL_WORDS[w]))
            i += 1
            continue
        is_dec = _DECIMAL.match(w) is not None
        starts_scale = i + 1 < n and words[i + 1] in _SCALES
        if not (w.isdigit() or is_dec or w in _UNITS or (w == "a" and starts_scale)):
            out.append(w)
            i += 1
            continue
        if len(w) > 15 or (is_dec and not starts_scale):
            out.append(w)
            i += 1
            continue
        total = 0.0
        current = float(w) if (w.isdigit() or is_dec) else float(_UNITS.get(w, 1))
        i += 1
        while i < n and total + current < _MAX_NUMBER:
            nxt = words[i]
            if nxt in _SCALES:
                current = (current or 1.0) * _SCALES[nxt]
                if _SCALES[nxt] >= 1000:
                    total, current = total + current, 0.0
                i += 1
            elif nxt in _UNITS and _can_add(words[i - 1], _UNITS[nxt]):
                current += _UNITS[nxt]
                i += 1
            elif nxt == "and" and words[i - 1] in _SCALES and i + 1 < n and words[i + 1] in _UNITS:
                i += 1
            else:
                break
        value = total + current
        out.append(_number_token(value) if math.isfinite(value) and value < _MAX_NUMBER else w)
    return out


_LIST_MARKER = re.compile(r"(?m)^\s*(?:\d{1,2}[.)]|[-*\u2022])\s+")


def _tokens(text: str) -> list[str]:
    """Canonical tokens: folded, punctuation split, numbers merged, units unified, articles dropped, stemmed.

    Numbered or bulleted list markers at the start of a line are dropped (a "2." is not the number two).
    """
    s = _fold(_LIST_MARKER.sub(" ", text))
    s = re.sub(r"(?<=\d),(?=\d{3})", "", s)
    s = s.replace("%", " percent ")
    words = re.findall(r"\d+\.\d+|[a-z0-9]+", s)
    words = _merge_numbers(words)
    out: list[str] = []
    for w in words:
        if w in ("a", "an", "the"):
            continue
        unit = _UNIT_WORDS.get(w)
        if unit is not None:
            out.extend(unit.split())
        else:
            out.append(_stem(w))
    return out


# ----------------------------------------------------------------------------------------------------
# Offline grader

_MAX_PREDICTION_CHARS = 4000  # answers are 64 tokens; this bounds the work on runaway text
_MAX_GOLD_CHARS = 1000
_MAX_QUESTION_CHARS = 2000
_TITLES = frozenset(
    """mr mrs ms dr sir saint st king queen prince princess lord lady president general major colonel
    captain rep senator sen pope bishop emperor khan gen col lt cardinal professor prof""".split()
)
# Words whose absence does not make an answer wrong: approximations, degree and frequency words, fillers.
_SOFT_WORDS = frozenset(
    """about around approximately roughly nearly almost some via through called known named
    most many much far very highly largely mainly mostly primarily especially particularly generally
    eventually strictly solid strong significant considerable various several certain such own
    now currently often usually typically""".split()
)
_MONTHS = frozenset(
    "january february march april may june july august september october november december".split()
)
_DATE_WORDS = _MONTHS | frozenset(
    "year season century early late mid middle beginning end around about circa c ad bc".split()
)
_NEGATIONS = frozenset("not no never neither nor none cannot".split())
_AUX = frozenset("is was are were did does do has have had be been".split())
_RUN_ON = re.compile(r"\n\s*(Q|Question|Passage|Context)\s*:", re.I)
_CUT = re.compile(
    r"\n\s*(A|Answer|Topic)\s*:|You are an AI assistant|\n\s*Step[- ]by[- ]step", re.I
)
_REFUSAL = re.compile(
    r"\b(not (provided|mentioned|specified|stated|given) in|no (specific |explicit )?(information|mention|data)"
    r"|(does|do|did) ?(not|n't) (say|mention|provide|specify|state)|question is (unclear|ambiguous)"
    r"|(i|we) (do not|don't|cannot|can't) (know|answer|determine)|i'm sorry|i am sorry|as an ai)\b",
    re.I,
)
_YES_NO_QUESTION = re.compile(
    r"^\s*(is|are|was|were|do|does|did|can|could|has|have|had|will|would|should|may|might)\b", re.I
)
_LIST_SPLIT = re.compile(r"\s*(?:,|;|&|\band also\b|\bas well as\b|\band\b|\bv\.?\s|\bvs\.?\s)\s*", re.I)
_DECADE = re.compile(r"^(\d{3})0s$")
_YEAR = re.compile(r"^(1\d{3}|20\d{2})$")
_FULL_RECALL_UP_TO = 3  # gold answers with up to this many informative words need all of them
_PARTIAL_RECALL = 0.6  # longer ones need this share


_ANTONYM_PAIRS = """more less higher lower larger smaller bigger smaller increase decrease increased decreased
    rise fall rising falling strong weak stronger weaker positive negative before after north south east west
    northern southern eastern western early late earlier later major minor maximum minimum gain loss
    win lose won lost internal external public private legal illegal direct indirect inner outer upper lower
    high low long short longer shorter older younger wet dry hot cold warm cool
    success failure successful unsuccessful true false correct incorrect possible impossible""".split()


def _antonym_table(words: list[str]) -> dict[str, frozenset[str]]:
    table: dict[str, set[str]] = {}
    for a, b in zip(words[::2], words[1::2], strict=True):
        table.setdefault(a, set()).add(b)
        table.setdefault(b, set()).add(a)
    return {k: frozenset(v) for k, v in table.items()}


_ANTONYMS = _antonym_table(_ANTONYM_PAIRS)


def _is_number(tok: str) -> bool:
    return tok[:1].isdigit()


def _find_seq(hay: list[str], needle: list[str]) -> int:
    """Start of the first occurrence of ``needle`` as a contiguous run in ``hay``, or -1."""
    k = len(needle)
    if k == 0:
        return -1
    first = needle[0]
    for i in range(len(hay) - k + 1):
        if hay[i] == first and hay[i : i + k] == needle:
            return i
    return -1


def _close(a: str, b: str) -> bool:
    """Fuzzy equality of two word tokens: a long shared prefix (inflection), or one edit apart (spelling)."""
    if a == b:
        return True
    if _is_number(a) or _is_number(b):
        return False
    la, lb = len(a), len(b)
    if min(la, lb) < 5:
        return False
    k = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        k += 1
    if k >= max(6, min(la, lb) - 3):
        return True
    if abs(la - lb) > 1:
        return False
    if la == lb:
        return a[k + 1 :] == b[k + 1 :]
    if la > lb:
        return a[k + 1 :] == b[k:]
    return a[k:] == b[k + 1 :]


def _token_match(g: str, p: str) -> bool:
    """Does prediction token ``p`` stand for gold token ``g``? (a decade matches its years)."""
    if g == p:
        return True
    m = _DECADE.match(g)
    if m:
        return len(p) == 4 and p.isdigit() and p[:3] == m.group(1)
    return _close(g, p)


class _Pred:
    """The prediction's canonical tokens, with a set for fast membership.

    ``q_tokens`` are the question's: a prediction word copied from the question is evidence only when it
    equals a gold word exactly, never through fuzzy matching (restating the question proves nothing).
    """

    def __init__(self, text: str, q_tokens: frozenset[str] | set[str] = frozenset()):
        self.toks = _tokens(text)
        self.set = set(self.toks)
        self.q_tokens = q_tokens

    def locate(self, g: str) -> int:
        """Position of the first token matching gold token ``g``, or -1."""
        if g in self.set:
            return self.toks.index(g)
        if _is_number(g) and not _DECADE.match(g):
            return -1
        for j, p in enumerate(self.toks):
            if p not in self.q_tokens and _token_match(g, p):
                return j
        return -1


def _gold_alternatives(gold: str) -> list[str]:
    """The gold plus the alternatives it spells out: "X (Y)", "X or Y", '"a", "b", or "c"', "a, b and/or c",
    and a name without its middle initial ("Arthur H. Compton")."""
    alts = [gold]
    no_initials = re.sub(r"\b([A-Z][a-z]+) [A-Z]\. (?=[A-Z])", r"\1 ", gold)
    if no_initials != gold:
        alts.append(no_initials)
    inner = re.findall(r"\(([^()]*)\)", gold)
    outer = re.sub(r"\([^()]*\)", " ", gold)
    if inner:
        alts.append(outer)
        alts.extend(inner)
    if "and/or" in outer:
        parts = re.split(r"\s*,\s*|\s*\band/or\b\s*", outer)
    else:
        parts = re.split(r"\s*,?\s*\bor\b\s*|\s*,\s*(?=[\"'])", outer)
    if len(parts) > 1:
        alts.extend(p for p in parts if p.strip())
    return alts


def _informative(gt: list[str], q_tokens: set[str]) -> list[str]:
    """Gold tokens that carry the answer: no stop, title or soft words, nothing the question already says.

    Falls back to the content words, then to all tokens, so that the result is never empty.
    """
    content = [t for t in gt if t not in _STOPWORDS and t not in _TITLES and t not in _SOFT_WORDS] or gt
    qwords = [w for w in q_tokens if not _is_number(w)]
    informative = [
        t for t in content
        if t not in q_tokens and (_is_number(t) or not any(_close(t, w) for w in qwords))
    ]
    return informative or content


def _match_alternative(q_tokens: set[str], alt: str, pred: _Pred) -> tuple[int, int] | None:
    """Where ``alt`` is conveyed in the prediction: a (start, end) token span, or None."""
    gt = _tokens(alt)
    if not gt:
        return None
    i = _find_seq(pred.toks, gt)
    if i >= 0:
        return i, i + len(gt)
    informative = _informative(gt, q_tokens)
    located = [pred.locate(t) for t in informative]
    if any(j < 0 for t, j in zip(informative, located, strict=True) if _is_number(t)):
        return None  # every number of the gold must be there
    positions = [j for j in located if j >= 0]
    needed = 1.0 if len(informative) <= _FULL_RECALL_UP_TO else _PARTIAL_RECALL
    if positions and len(positions) / len(informative) >= needed:
        return min(positions), max(positions) + 1
    return None


def _list_match(gold: str, q_tokens: set[str], pred: _Pred) -> bool:
    """Enumerations ("X, Y and Z"): every item must be there, but an item counts when at least half of
    its own informative words (and all of its numbers) are."""
    items = [it for it in _LIST_SPLIT.split(re.sub(r"\([^()]*\)", " ", gold)) if it and _tokens(it)]
    if len(items) < 2:
        return False
    for it in items:
        informative = _informative(_tokens(it), q_tokens)
        located = [pred.locate(t) >= 0 for t in informative]
        if not all(ok for t, ok in zip(informative, located, strict=True) if _is_number(t)):
            return False
        if sum(located) < max(1, len(informative) / 2):
            return False
    return True


def _contradicted(span: tuple[int, int], ptoks: list[str], gt: list[str], q_tokens: set[str]) -> bool:
    """Is the located answer negated, hedged between options, or only one end of a numeric range?

    Negation: a negation word just before the answer ("not 1508"), or right after it through an
    auxiliary ("Bernini is not represented"); ignored when the question itself is negative.
    Hedge: "either … or" around the answer. Range/options: a single gold number given as an end of
    "X to Y", "between X and Y" or as one of "X or Y".
    """
    start, end = span
    if not (q_tokens & _NEGATIONS):
        if any(t in _NEGATIONS for t in ptoks[max(0, start - 3) : start]):
            return True
        after = ptoks[end : end + 3]
        if len(after) >= 2 and after[0] in _AUX and after[1] in _NEGATIONS:
            return True
    if "either" in ptoks[max(0, start - 6) : start] and "or" in ptoks[end : end + 8] and "or" not in gt:
        return True
    numbers = [t for t in gt if _is_number(t)]
    if len(numbers) == 1 and not {"to", "between", "or", "and"} & set(gt):
        number = numbers[0]
        for j, t in enumerate(ptoks):
            if t != number:
                continue
            nxt = ptoks[j + 1 : j + 3]
            if len(nxt) == 2 and nxt[0] in ("to", "and", "or") and _is_number(nxt[1]) and nxt[1] != number:
                return True
            prev = ptoks[max(0, j - 2) : j]
            if len(prev) == 2 and prev[1] in ("to", "and", "or") and _is_number(prev[0]) and prev[0] != number:
                return True
    return False


def _date_match(gt: list[str], pred: _Pred) -> bool | None:
    """Dates: "1508" conveys "9 March 1508" unless another month is named; "1978" conveys "late 1970s".

    Returns None when the gold is not a date (a year or decade plus only date words and small numbers).
    """
    years = [t for t in gt if _YEAR.match(t) or _DECADE.match(t)]
    if not years:
        return None
    rest = [t for t in gt if t not in years and t not in _STOPWORDS]
    if any(not (t in _DATE_WORDS or (t.isdigit() and int(t) <= 99)) for t in rest):
        return None
    if not all(any(_token_match(y, p) for p in pred.toks) for y in years):
        return False
    gold_months = {t for t in gt if t in _MONTHS}
    if gold_months and (pred.set & _MONTHS) - gold_months and not (pred.set & gold_months):
        return False
    return True


def _antonym_clash(gt: list[str], pred: _Pred) -> bool:
    """The gold says "weak", "higher", "south"… and the prediction says only the opposite."""
    return any(w not in pred.set and _ANTONYMS[w] & pred.set for w in gt if w in _ANTONYMS)


def _yes_no(question: str, gt: list[str], pred: _Pred) -> bool | None:
    """Yes/no questions: compare the gold's polarity with the prediction's opening yes/no.

    Returns None when the question is not a yes/no question (or is a choice "A or B?") or the prediction
    does not open with yes/no.
    """
    if not _YES_NO_QUESTION.match(question) or re.search(r"\bor\b", question, re.I):
        return None
    if not pred.toks or pred.toks[0] not in ("yes", "no"):
        return None
    gold_negative = gt[:1] == ["no"] or any(t in _NEGATIONS for t in gt)
    return (pred.toks[0] == "no") == gold_negative


def _one_word_part(gt: list[str], pred: _Pred, q_tokens: set[str]) -> bool:
    """A one-word answer that is part of the gold ("1508" for "9 March 1508", "P" for "complexity class P"),
    when the gold is short (at most two informative words, or the word is a number) and not a conjunction
    that needs all its parts."""
    if "and" in gt:
        return False
    words = [t for t in pred.toks if t not in _STOPWORDS and t not in _SOFT_WORDS]
    if len(words) != 1 or words[0] in q_tokens:
        return False
    if len(_informative(gt, q_tokens)) > 2 and not _is_number(words[0]):
        return False  # one word out of a long answer is too little
    return any(_token_match(g, words[0]) for g in gt)


def grade(question: str, gold: str, prediction: str) -> bool:
    """The default offline grader: does ``prediction`` convey ``gold`` without contradicting it?

    Meant to reproduce SEAL's GPT-4.1 judge (see the module docstring for the rules and their
    calibration). Deterministic, fast, and never raises: ``None`` or non-string arguments are read as
    text, an empty gold or prediction is a no, and very long text is cut.
    """
    try:
        return _grade(question, gold, prediction)
    except Exception:  # a grader must never take a run down
        return False


def _grade(question: object, gold: object, prediction: object) -> bool:
    return _rule_verdict(question, gold, prediction)[0] is True


def rule_verdict(question: str, gold: str, prediction: str) -> bool | None:
    """The three-way verdict behind :func:`grade`: True (the gold is conveyed), False (a definite no:
    empty text, run-on, refusal, the wrong yes/no, an antonym, a wrong date, or the gold found but
    negated/hedged), or None (undecided: the gold's words are simply not there, so only a paraphrase
    could still convey it; also text the rules cannot read, such as another script or lone punctuation).
    ``grade`` treats None as no; a costlier check (an LLM judge) needs to look only at the None rows.
    Never raises (input the rules fail on is undecided)."""
    try:
        return _rule_verdict(question, gold, prediction)[0]
    except Exception:
        return None


def _rule_verdict(question: object, gold: object, prediction: object) -> tuple[bool | None, str]:
    """:func:`rule_verdict` plus the prediction the rules read (cut at a leaked prompt or ``A:`` block)."""
    q = ("" if question is None else str(question))[:_MAX_QUESTION_CHARS]
    g = ("" if gold is None else str(gold))[:_MAX_GOLD_CHARS]
    p = ("" if prediction is None else str(prediction))[:_MAX_PREDICTION_CHARS]
    if _RUN_ON.search(p):
        return False, p
    m = _CUT.search(p)
    if m:
        p = p[: m.start()]
    if not p.strip() or not g.strip():
        return False, p
    q_tokens = set(_tokens(q))
    pred = _Pred(p, q_tokens)
    gt = _tokens(g)
    if not pred.toks or not gt:
        return None, p  # nothing the rules can read (another script, lone punctuation or articles)
    if _REFUSAL.search(p):
        return False, p
    polar = _yes_no(q, gt, pred)
    if polar is not None:
        return polar, p
    if _antonym_clash(gt, pred):
        return False, p
    dated = _date_match(gt, pred)
    if dated is not None:
        if not dated:
            return False, p
        years = [t for t in gt if _YEAR.match(t) or _DECADE.match(t)]
        year = next((j for j in map(pred.locate, years) if j >= 0), None)
        if year is None:  # the date matches only a word copied from the question: no evidence either way
            return None, p
        return not _contradicted((year, year + 1), pred.toks, gt, q_tokens), p
    if _one_word_part(gt, pred, q_tokens) or _list_match(g, q_tokens, pred):
        return True, p
    contradicted = False
    for alt in _gold_alternatives(g):
        span = _match_alternative(q_tokens, alt, pred)
        if span is not None:
            if not _contradicted(span, pred.toks, gt, q_tokens):
                return True, p
            contradicted = True
    return (False if contradicted else None), p


# ----------------------------------------------------------------------------------------------------
# Registry


def _exact_match_grader(question: str, gold: str, prediction: str) -> bool:
    """SQuAD exact match as a grader (the question is ignored)."""
    return exact_match(gold, prediction)


def _f1_half_grader(question: str, gold: str, prediction: str) -> bool:
    """SQuAD token F1 of at least 0.5 as a grader (the question is ignored)."""
    return f1_score(gold, prediction) >= 0.5


GRADERS: dict[str, Grader] = {
    "offline": grade,
    "exact_match": _exact_match_grader,
    "f1>=0.5": _f1_half_grader,
    "contains": contains_gold,
}

# Graders that need a model (built with JudgeGrader(lm) by the run): every answer goes to the model, or only
# those :func:`rule_verdict` leaves undecided.
JUDGE_GRADERS = {"judge": False, "rules+judge": True}  # name -> JudgeGrader's rules_first


def get_grader(name: str) -> Grader:
    """The grader registered under ``name`` in :data:`GRADERS` (``grader(question, gold, prediction) -> bool``).

    Raises:
      ValueError: naming the unknown grader and listing the registered ones.
    """
    try:
        return GRADERS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown grader {name!r}; registered graders: {', '.join(sorted(GRADERS))} "
            "('judge' and 'rules+judge' need a model: JudgeGrader(lm, rules_first=...))"
        ) from None
