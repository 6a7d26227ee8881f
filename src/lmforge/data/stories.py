"""The built-in story corpus: a seeded generator of short children's stories with an exact floor.

``lmforge prepare --builtin stories`` trains on this, offline.  Every story is one "lost and found"
episode in the same small world::

    One windy day, Mia lost her red kite by the pond. Tom came to help. They looked under the bed.
    Tom found it by the pond. Mia thanked Tom. They flew a kite in the wind.

Grammar (``{x}`` is a slot; ``|`` separates the shapes a recorded choice picks between)::

    opening   One {weather} day, {hero} lost {his} {color} {object}[ {lost_place}].
            | It was {weather}. {hero} lost {his} {color} {object}[ {lost_place}].
    helper    {helper} came to help. | {He} called {helper}.
    search    nothing | They looked {place}. | It was not {place}.
            | They looked {place} and {place}.          (only when the lost place was not said)
    found     {finder} found the {color} {object} {found_place}. | {finder} found it {found_place}.
            | At last, {finder} found it {found_place}.   (always, and only, after two searches)
    thanks    {hero} thanked {helper}. | {hero} hugged {helper}.
    ending    Then they {action}. | They {action} in the {sun|rain|wind|snow|cold}.

Long-range structure (what happens early decides what comes later):

* the object is found exactly where it was lost when the opening says where; otherwise the found
  place is a fresh choice, but never a place already searched;
* searched places are never the lost place and never repeat;
* the pronouns follow the hero's gender, the object and its colour come back in the found sentence,
  the helper from the second sentence is the one thanked;
* the weather of the first sentence shapes the last one: it changes which actions are likely
  (sledding when snowy, puddles when rainy) and names the weather again ("in the snow").

Why the entropy floor is exact.  The story is written by one program, ``_story_program``, a
Python generator that yields literal text and *choice requests*.  Each request names a slot and an
explicit finite distribution; a driver answers it (by sampling, or by replaying a given choice list)
and adds ``log p(value)`` to the story's log-probability.  Nothing else is random: pronouns,
repeated objects, the found place when the lost place is known, punctuation and the end of the
story are deterministic functions of earlier choices, so ``logprob`` is the log-probability of the
whole text.  The grammar is unambiguous (``parse_story`` searches *all* choice sequences consistent
with a text and refuses a text with none or with more than one), so the text determines the choices
and ``p(text) = exp(logprob)``.  Summed over a split (with one end-of-text token per story, itself
determined by the text) and divided by its token count, ``-logprob`` is therefore the best loss any
model can reach: the entropy floor that ``meta.json`` records.  Windows that start in the middle of
a story cannot see its beginning, so real models sit a little above it; none can go below.

The reading quiz (``prepare --builtin stories --quiz N``, the demo uses 3) writes N lines
"question answer" after each story, drawn from the story's own Q&A pairs; its choice of questions
is counted in the floor the same way (``add_quiz``, ``parse_document``).  The Q&A files written
for the instruction phase hold the story alone.

Design for a tiny character-level model (context 256): every story has 109 to 204 characters
(about 164 on average; the bounds are checked exhaustively by the tests), so a prompt "story +
question + answer" fits in 256 characters.  The vocabulary is the inventories below and a few
function words; the randomness sits in the names, objects, places and actions, so the text carries
about 0.18 nats per character (``describe()`` measures it).  Only ASCII letters, spaces and ``.,``
occur.
"""

from __future__ import annotations

import bisect
import functools
import math
import random
import re
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "ACTIONS",
    "COLORS",
    "MAX_STORY_CHARS",
    "MIN_STORY_CHARS",
    "NAMES",
    "OBJECTS",
    "PLACES",
    "SENTENCE_SHAPES",
    "WEATHERS",
    "Story",
    "add_quiz",
    "describe",
    "generate_stories",
    "parse_document",
    "parse_story",
    "render_story",
    "story_logprob",
    "story_shapes",
]

# --------------------------------------------------------------------------------------------------
# Inventories.  Weights are explicit and non-uniform (Zipf-like) so that the floor rewards learning
# frequencies as well as spellings; no name is a prefix of another, and object and place nouns are
# disjoint, so a tiny model never has to resolve such overlaps (the parser would cope anyway).
# --------------------------------------------------------------------------------------------------


def _zipf(n: int, offset: float = 6.0) -> tuple[float, ...]:
    """Weights ``1 / (rank + offset)``: gently non-uniform, first/last = (n - 1 + offset)/offset."""
    return tuple(1.0 / (rank + offset) for rank in range(n))


# (name, "f" | "m"): the gender fixes the pronouns, so it costs no choice.
NAMES: tuple[tuple[str, str], ...] = (
    ("Mia", "f"), ("Tom", "m"), ("Lily", "f"), ("Ben", "m"), ("Emma", "f"), ("Max", "m"),
    ("Zoe", "f"), ("Sam", "m"), ("Ava", "f"), ("Leo", "m"), ("Lucy", "f"), ("Jack", "m"),
    ("Ruby", "f"), ("Finn", "m"), ("Nora", "f"), ("Noah", "m"), ("Ella", "f"), ("Owen", "m"),
    ("Rosa", "f"), ("Adam", "m"), ("Jade", "f"), ("Eli", "m"), ("Kate", "f"), ("Hugo", "m"),
    ("Anna", "f"), ("Luke", "m"), ("Maya", "f"), ("Omar", "m"), ("Hana", "f"), ("Ravi", "m"),
    ("Iris", "f"), ("Theo", "m"), ("Ivy", "f"), ("Kai", "m"), ("Sara", "f"), ("Dan", "m"),
    ("Tess", "f"), ("Jon", "m"), ("Lena", "f"), ("Milo", "m"),
)  # fmt: skip
_GENDER = dict(NAMES)

COLORS: tuple[str, ...] = ("red", "blue", "green", "pink", "white", "black", "brown", "gold")

OBJECTS: tuple[str, ...] = (
    "ball", "kite", "hat", "book", "doll", "drum", "cup", "sock", "shoe", "key",
    "ring", "coin", "bell", "boat", "car", "train", "robot", "puppet", "crayon", "pencil",
    "brush", "comb", "scarf", "mitten", "glove", "bag", "box", "jar", "spoon", "shell",
    "stone", "marble", "bottle", "flute", "yoyo", "wagon", "bucket", "shovel", "rope", "map",
    "clock", "lamp", "candle", "button", "ribbon", "quilt", "pillow", "teapot", "plate", "medal",
    "pebble", "basket", "letter", "flag", "magnet", "badge", "mask", "crown", "wand", "watch",
)  # fmt: skip

# Each place carries its preposition: it is the whole answer to "Where was the kite found?".
PLACES: tuple[str, ...] = (
    "under the bed", "under the rug", "under the slide", "under the table", "under the desk",
    "in the garden", "in the kitchen", "in the barn", "in the sandbox", "in the attic",
    "in the shed", "in the closet", "in the bathtub", "in the forest", "in the grass",
    "by the pond", "by the river", "by the fence", "by the well",
    "near the gate", "on the swings", "near the lake",
    "on the roof", "on the porch", "on the hill",
    "at the beach", "at the park",
    "behind the tree", "behind the door", "behind the sofa",
)  # fmt: skip

# weather -> the noun that names it again in the last sentence ("Then they ... in the snow.").
WEATHERS: tuple[tuple[str, str], ...] = (
    ("sunny", "sun"),
    ("rainy", "rain"),
    ("windy", "wind"),
    ("snowy", "snow"),
    ("cold", "cold"),
)
_WEATHER_NOUN = dict(WEATHERS)
_WEATHER_WEIGHTS = (4.0, 3.0, 2.0, 2.0, 1.0)

# (action, weather it belongs to or "" for any weather).  Actions tied to a weather only happen
# in that weather, and are likelier there than the general ones: the long-range weather -> action
# dependency.  All are past-tense phrases that read after "Then they".
ACTIONS: tuple[tuple[str, str], ...] = (
    ("played tag", ""), ("sang a song", ""), ("drew a picture", ""), ("baked a cake", ""),
    ("read a story", ""), ("built a fort", ""), ("had a picnic", ""), ("played catch", ""),
    ("danced", ""), ("ate cookies", ""), ("drank milk", ""), ("told jokes", ""),
    ("played cards", ""), ("made a tower", ""), ("painted a sign", ""), ("went home", ""),
    ("took a nap", ""), ("fed the ducks", ""), ("ran a race", ""), ("rode bikes", ""),
    ("planted seeds", ""), ("watched birds", ""), ("made a card", ""), ("had lunch", ""),
    ("ate apples", ""), ("played music", ""), ("climbed a tree", ""), ("did a puzzle", ""),
    ("blew bubbles", ""), ("jumped rope", ""), ("played house", ""), ("laughed", ""),
    ("went swimming", "sunny"), ("ate ice cream", "sunny"), ("picked flowers", "sunny"),
    ("dug in the sand", "sunny"),
    ("splashed about", "rainy"), ("sailed boats", "rainy"), ("heard the rain", "rainy"),
    ("flew a kite", "windy"), ("chased leaves", "windy"), ("made a pinwheel", "windy"),
    ("built a snowman", "snowy"), ("threw snowballs", "snowy"), ("went sledding", "snowy"),
    ("went skating", "snowy"),
    ("drank hot cocoa", "cold"), ("sat by the fire", "cold"), ("knitted hats", "cold"),
    ("made warm soup", "cold"),
)  # fmt: skip
_WEATHER_ACTION_WEIGHT = 3.0  # a weather's own actions, relative to 1.0 for a general action

# Every sentence shape the program can write (the keys are what ``story_shapes`` reports).
SENTENCE_SHAPES: dict[str, str] = {
    "open_day_place": "One {weather} day, {hero} lost {his} {color} {object} {lost_place}.",
    "open_day": "One {weather} day, {hero} lost {his} {color} {object}.",
    "weather_was": "It was {weather}.",
    "lost_place": "{hero} lost {his} {color} {object} {lost_place}.",
    "lost": "{hero} lost {his} {color} {object}.",
    "help_came": "{helper} came to help.",
    "help_called": "{He} called {helper}.",
    "search_looked": "They looked {place}.",
    "search_not": "It was not {place}.",
    "search_two": "They looked {place} and {place}.",
    "found_object": "{finder} found the {color} {object} {found_place}.",
    "found_it": "{finder} found it {found_place}.",
    "found_at_last": "At last, {finder} found it {found_place}.",
    "thanks": "{hero} thanked {helper}.",
    "hug": "{hero} hugged {helper}.",
    "end": "Then they {action}.",
    "end_weather": "They {action} in the {weather noun}.",
}

# Bounds on every story's length (the tests find the true extremes, 109 and 204, exhaustively).
MIN_STORY_CHARS = 100
MAX_STORY_CHARS = 205  # so a story + question + answer + chat markers fits in 256 characters

# --------------------------------------------------------------------------------------------------
# Explicit finite distributions and the choice protocol.
# --------------------------------------------------------------------------------------------------


class _Dist:
    """A finite distribution over strings with explicit positive weights (normalised on use)."""

    __slots__ = ("values", "weights", "total", "_cum", "_index")

    def __init__(self, values: Sequence[str], weights: Sequence[float]) -> None:
        if len(values) != len(weights) or not values:
            raise ValueError("a distribution needs one positive weight per value")
        if len(set(values)) != len(values) or min(weights) <= 0:
            raise ValueError("distribution values must be distinct with positive weights")
        self.values = tuple(values)
        self.weights = tuple(float(w) for w in weights)
        cum: list[float] = []
        acc = 0.0
        for w in self.weights:
            acc += w
            cum.append(acc)
        self.total = acc
        self._cum = cum
        self._index = {v: i for i, v in enumerate(self.values)}

    def without(self, excluded: Iterable[str]) -> _Dist:
        """The same distribution conditioned on not being any of ``excluded``."""
        drop = set(excluded)
        kept = [(v, w) for v, w in zip(self.values, self.weights) if v not in drop]
        return _Dist([v for v, _ in kept], [w for _, w in kept])

    def sample(self, rng: random.Random) -> str:
        i = bisect.bisect_right(self._cum, rng.random() * self.total)
        return self.values[min(i, len(self.values) - 1)]  # min(): guard float round-off at 1.0

    def logp(self, value: str) -> float:
        """Natural-log probability of ``value``; KeyError if it has probability zero."""
        return math.log(self.weights[self._index[value]] / self.total)


class _Choice(NamedTuple):
    """A request from the story program: pick a value of ``slot`` from ``dist``.

    ``surface`` maps each value to the text the driver writes right after choosing it (None:
    nothing; the program writes whatever follows).  It lets the parser discard values that do not
    match the text at once instead of trying each.
    """

    slot: str
    dist: _Dist
    surface: dict[str, str] | None = None


def _identity(values: Sequence[str]) -> dict[str, str]:
    return {v: v for v in values}


_NAME_DIST = _Dist([n for n, _ in NAMES], _zipf(len(NAMES)))
_NAME_SURFACE = _identity(_NAME_DIST.values)
_COLOR_DIST = _Dist(COLORS, _zipf(len(COLORS), offset=3.0))
_COLOR_SURFACE = _identity(COLORS)
_OBJECT_DIST = _Dist(OBJECTS, _zipf(len(OBJECTS), offset=10.0))
_OBJECT_SURFACE = _identity(OBJECTS)
_PLACE_DIST = _Dist(PLACES, _zipf(len(PLACES), offset=8.0))
_PLACE_SURFACE = _identity(PLACES)
_WEATHER_DIST = _Dist([w for w, _ in WEATHERS], _WEATHER_WEIGHTS)
_WEATHER_SURFACE = _identity(_WEATHER_DIST.values)
_ACTION_DISTS = {
    weather: _Dist(
        [a for a, tag in ACTIONS if tag in ("", weather)],
        [
            1.0 if tag == "" else _WEATHER_ACTION_WEIGHT
            for a, tag in ACTIONS
            if tag in ("", weather)
        ],
    )
    for weather, _ in WEATHERS
}
_ACTION_SURFACE = _identity([a for a, _ in ACTIONS])

# Structural choices.  Each writes its own text at once ("surface"), so the parser sees which
# value was taken from the very next characters; only "search" needs a short look-ahead.
_OPENING = _Dist(["one_day", "it_was"], [3.0, 1.0])
_OPENING_SURFACE = {"one_day": "One ", "it_was": "It was "}
_SAY_PLACE = _Dist(["yes", "no"], [2.0, 1.0])  # does the opening say where it was lost?
_SAY_PLACE_SURFACE = {"yes": " ", "no": "."}
_HELP_SHAPE = _Dist(["came", "called"], [2.0, 1.0])
# Searches before the object is found.  When the hero knows where it was lost they look at most
# once elsewhere; otherwise up to two places ("two": both in one sentence).  Both rules keep the
# longest story within MAX_STORY_CHARS without any length-dependent choice.
_SEARCH_KNOWN = _Dist(["none", "looked", "not"], [2.0, 1.0, 1.0])
_SEARCH_UNKNOWN = _Dist(["none", "looked", "not", "two"], [1.0, 1.0, 1.0, 2.0])
_SEARCH_SURFACE = {
    "none": "",
    "looked": " They looked ",
    "not": " It was not ",
    "two": " They looked ",
}
_FINDER = _Dist(["they", "hero", "helper"], [2.0, 1.0, 1.0])
_FOUND_SHAPE = _Dist(["object", "it"], [1.0, 1.0])
_FOUND_SURFACE = {"object": " found the ", "it": " found it "}
_THANKS = _Dist(["thanked", "hugged"], [2.0, 1.0])
_THANKS_SURFACE = {"thanked": " thanked ", "hugged": " hugged "}
_END_SHAPE = _Dist(["plain", "weather"], [1.0, 1.0])
_END_SURFACE = {"plain": " Then they ", "weather": " They "}

_Program = Generator["str | _Choice", "str | None", "list[tuple[str, str]]"]

# --------------------------------------------------------------------------------------------------
# The story program: the single source of truth for generation, parsing and log-probabilities.
# --------------------------------------------------------------------------------------------------


@functools.cache
def _places_except(taken: frozenset[str]) -> _Dist:
    # Bounded: at most three places are ever excluded at once.
    return _PLACE_DIST.without(taken)


@functools.cache
def _helpers_for(hero: str) -> _Dist:
    return _NAME_DIST.without([hero])


def _story_program(shapes: list[str] | None = None) -> _Program:
    """Yield literal text and choice requests for one story; return its question-answer pairs.

    The driver sends back the chosen value for every ``_Choice`` (and None for text) and writes the
    choice's surface text itself.  Choices are requested in text order, so the parser can check each
    piece of text as soon as it is written.  ``shapes`` (if given) collects the sentence-shape ids
    used, for ``story_shapes``.
    """
    used = shapes if shapes is not None else []

    opening = yield _Choice("opening", _OPENING, _OPENING_SURFACE)
    weather = yield _Choice("weather", _WEATHER_DIST, _WEATHER_SURFACE)
    yield " day, " if opening == "one_day" else ". "
    hero = yield _Choice("hero", _NAME_DIST, _NAME_SURFACE)
    he, his = ("She", "her") if _GENDER[hero] == "f" else ("He", "his")
    yield f" lost {his} "
    color = yield _Choice("color", _COLOR_DIST, _COLOR_SURFACE)
    yield " "
    obj = yield _Choice("object", _OBJECT_DIST, _OBJECT_SURFACE)
    lost_place: str | None = None
    if (yield _Choice("say_place", _SAY_PLACE, _SAY_PLACE_SURFACE)) == "yes":
        lost_place = yield _Choice("lost_place", _PLACE_DIST, _PLACE_SURFACE)
        yield "."
    if opening == "one_day":
        used.append("open_day_place" if lost_place else "open_day")
    else:
        used += ["weather_was", "lost_place" if lost_place else "lost"]

    # The helper is anyone but the hero (the hero's weight is removed and the rest renormalised).
    help_shape = yield _Choice("help_shape", _HELP_SHAPE, {"came": " ", "called": f" {he} called "})
    helper = yield _Choice("helper", _helpers_for(hero), _NAME_SURFACE)
    yield " came to help." if help_shape == "came" else "."
    used.append("help_" + help_shape)

    # Failed searches: distinct places, never where the object really is (when that is known yet).
    searched: list[str] = []
    known = lost_place is not None
    search = yield _Choice("search", _SEARCH_KNOWN if known else _SEARCH_UNKNOWN, _SEARCH_SURFACE)
    if search != "none":
        taken = frozenset([lost_place] if lost_place else [])
        searched.append((yield _Choice("search_place", _places_except(taken), _PLACE_SURFACE)))
        if search == "two":
            yield " and "
            taken = frozenset(searched)
            searched.append((yield _Choice("search_place", _places_except(taken), _PLACE_SURFACE)))
        yield "."
        used.append("search_" + search)

    # Found: after two searches it is "At last"; where it was lost if the opening said so (no
    # choice), else anywhere not searched.
    if search == "two":
        yield " At last, "
        surface = {"they": "they", "hero": hero, "helper": helper}
        finder_role = yield _Choice("finder", _FINDER, surface)
        yield " found it "
        used.append("found_at_last")
    else:
        surface = {"they": " They", "hero": " " + hero, "helper": " " + helper}
        finder_role = yield _Choice("finder", _FINDER, surface)
        found_shape = yield _Choice("found_shape", _FOUND_SHAPE, _FOUND_SURFACE)
        if found_shape == "object":
            yield f"{color} {obj} "
        used.append("found_" + found_shape)
    finder = {"they": "They", "hero": hero, "helper": helper}[finder_role]
    if lost_place is not None:
        found_place = lost_place
        yield found_place
    else:
        found_place = yield _Choice(
            "found_place", _places_except(frozenset(searched)), _PLACE_SURFACE
        )
    yield "."

    # The helper met at the start is the one thanked.
    yield " " + hero
    thanks = yield _Choice("thanks", _THANKS, _THANKS_SURFACE)
    yield helper + "."
    used.append("thanks" if thanks == "thanked" else "hug")

    # The weather of the first sentence decides which actions are likely, and may be named again.
    end_shape = yield _Choice("end_shape", _END_SHAPE, _END_SURFACE)
    action = yield _Choice("action", _ACTION_DISTS[weather], _ACTION_SURFACE)
    yield "." if end_shape == "plain" else f" in the {_WEATHER_NOUN[weather]}."
    used.append("end" if end_shape == "plain" else "end_weather")

    # Questions whose answers are written in the story (a test checks each answer occurs in it).
    qa = [
        (f"Who lost the {obj}?", hero),
        (f"What did {hero} lose?", f"{his} {color} {obj}"),
        (f"Who helped {hero}?", helper),
        (f"Where was the {obj} found?", found_place),
        (f"What color was the {obj}?", color),
        ("What was the weather like?", weather),
        ("What did they do at the end?", action),
    ]
    if lost_place is not None:
        qa.append((f"Where was the {obj} lost?", lost_place))
    if searched:
        qa.append(("Where did they look first?", searched[0]))
    if finder_role != "they":
        qa.append((f"Who found the {obj}?", finder))
    if thanks == "thanked":
        qa.append((f"Who did {hero} thank?", helper))
    return qa


# The kinds of question `_story_program` asks, for accuracy by kind (`lmforge eval`).
QUESTION_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("who lost", r"Who lost the [\w ]+\?"),
        ("what was lost", r"What did \w+ lose\?"),
        ("who helped", r"Who helped \w+\?"),
        ("where found", r"Where was the [\w ]+ found\?"),
        ("what color", r"What color was the [\w ]+\?"),
        ("weather", r"What was the weather like\?"),
        ("what they did", r"What did they do at the end\?"),
        ("where lost", r"Where was the [\w ]+ lost\?"),
        ("where looked first", r"Where did they look first\?"),
        ("who found", r"Who found the [\w ]+\?"),
        ("who was thanked", r"Who did \w+ thank\?"),
    )
)


def question_kind(question: str) -> str:
    """The kind of a built-in story question ("what color", "who lost", ...), or "other"."""
    return next((k for k, pattern in QUESTION_KINDS if pattern.fullmatch(question)), "other")


# --------------------------------------------------------------------------------------------------
# Drivers: sample, replay, parse.
# --------------------------------------------------------------------------------------------------


@dataclass
class Story:
    text: str  # the story, plain text, no trailing separator
    logprob: float  # natural-log probability of ALL the generator's random choices (<= 0)
    qa: list[tuple[str, str]] = field(default_factory=list)  # answers follow from the text
    choices: list[tuple[str, str]] = field(default_factory=list)  # (slot, value), generation order
    quiz: str = ""  # the reading quiz written after the story ("" without one), see `add_quiz`
    quiz_logprob: float = 0.0  # natural-log probability of the quiz's choice of questions

    @property
    def document(self) -> str:
        """What the corpus holds: the story, then its quiz lines (if any)."""
        return self.text + self.quiz

    @property
    def document_logprob(self) -> float:
        """Natural-log probability of ``document``: the story's choices and the quiz's."""
        return self.logprob + self.quiz_logprob


def _sample(rng: random.Random) -> Story:
    program = _story_program()
    parts: list[str] = []
    choices: list[tuple[str, str]] = []
    logprob = 0.0
    request = next(program)
    try:
        while True:
            if isinstance(request, str):
                parts.append(request)
                request = program.send(None)
                continue
            value = request.dist.sample(rng)
            choices.append((request.slot, value))
            logprob += request.dist.logp(value)
            if request.surface is not None:
                parts.append(request.surface[value])
            request = program.send(value)
    except StopIteration as stop:
        qa = stop.value
    return Story("".join(parts), logprob, qa, choices)


def _replay(
    choices: Sequence[tuple[str, str]], shapes: list[str] | None = None
) -> tuple[str, float, list[tuple[str, str]]]:
    """Run the program on a given choice list: (text, logprob, qa); ValueError if not valid."""
    program = _story_program(shapes)
    parts: list[str] = []
    logprob = 0.0
    i = 0
    request = next(program)
    try:
        while True:
            if isinstance(request, str):
                parts.append(request)
                request = program.send(None)
                continue
            if i >= len(choices):
                raise ValueError(f"choice list ends early: slot {request.slot!r} is missing")
            slot, value = choices[i]
            if slot != request.slot:
                raise ValueError(f"choice {i}: expected slot {request.slot!r}, got {slot!r}")
            try:
                logprob += request.dist.logp(value)
            except KeyError:
                raise ValueError(f"choice {i}: {value!r} is impossible for {slot!r}") from None
            if request.surface is not None:
                parts.append(request.surface[value])
            i += 1
            request = program.send(value)
    except StopIteration as stop:
        qa = stop.value
    if i != len(choices):
        raise ValueError(f"{len(choices) - i} choices left over after the story ended")
    return "".join(parts), logprob, qa


def generate_stories(seed: int, size_bytes: int, quiz: int = 0) -> Iterator[Story]:
    """Stories drawn from ``random.Random(seed)`` until at least ``size_bytes`` of text is produced.

    ``quiz`` > 0 follows each story with a reading quiz of that many questions (``add_quiz``),
    drawn from a second generator so the stories themselves are the same with or without it; the
    size then counts the quiz text too.  Deterministic: the same seed gives byte-identical stories
    on every platform (``random.Random`` with an integer or str seed is specified to be
    reproducible across Python versions).
    """
    rng = random.Random(seed)
    quiz_rng = random.Random(f"lmforge-quiz-{seed}")
    produced = 0
    while produced < size_bytes:
        story = _sample(rng)
        if quiz > 0:
            add_quiz(story, quiz, quiz_rng)
        produced += len(story.document)  # ASCII only: characters == bytes
        yield story


# --------------------------------------------------------------------------------------------------
# The reading quiz: a story followed by questions about it and their answers, in plain text.
#
#     One windy day, Ben lost his red candle. He called Tom. ... They had a picnic in the wind.
#     Who helped Ben? Tom
#     Where was the candle found? on the swings
#
# Each line is "\n" + question + " " + answer, with the questions and answers of ``Story.qa``
# (the ones the instruction phase asks).  The questions are distinct, each drawn uniformly from
# those not yet asked, so the quiz's log-probability is -sum(log(remaining)); the answers follow
# from the story and cost nothing.  A model that reaches the floor on a quiz line has read the
# story: pretraining on quizzed stories teaches the look-up that answering needs, and the
# instruction phase builds on it (the demo: 49 % of held-out questions after SFT, 37 % without).
# --------------------------------------------------------------------------------------------------


def add_quiz(story: Story, n: int, rng: random.Random) -> Story:
    """Write ``n`` quiz lines after ``story`` (fewer if it has fewer questions); returns it."""
    remaining = list(story.qa)
    lines: list[str] = []
    logprob = 0.0
    for _ in range(min(n, len(remaining))):
        logprob -= math.log(len(remaining))
        question, answer = remaining.pop(rng.randrange(len(remaining)))
        lines.append(f"\n{question} {answer}")
    story.quiz, story.quiz_logprob = "".join(lines), logprob
    return story


def parse_document(text: str) -> Story:
    """Parse a corpus document (a story and its quiz lines, if any) back into its ``Story``.

    ValueError if the story does not parse, or a quiz line is not a question about it followed
    by its answer, or asks a question twice.  The quiz's log-probability is recomputed from the
    text, so ``document_logprob`` of the result is that of ``text``.
    """
    story_text, *quiz_lines = text.split("\n")
    story = render_story(parse_story(story_text))
    remaining = dict(story.qa)
    logprob = 0.0
    for line in quiz_lines:
        question, sep, answer = line.partition("? ")
        question += "?"
        if not sep or question not in remaining:
            raise ValueError(f"not a question about the story, or asked twice: {line!r}")
        if remaining[question] != answer:
            raise ValueError(f"wrong answer in the quiz: {line!r}")
        logprob -= math.log(len(remaining))
        del remaining[question]
    story.quiz = "".join("\n" + line for line in quiz_lines)
    story.quiz_logprob = logprob
    return story


def story_logprob(choices: Sequence[tuple[str, str]]) -> float:
    """Natural-log probability of a choice sequence under the generator (ValueError if invalid)."""
    return _replay(choices)[1]


def render_story(choices: Sequence[tuple[str, str]]) -> Story:
    """The story a choice sequence writes, with its log-probability and questions."""
    text, logprob, qa = _replay(choices)
    return Story(text, logprob, qa, [(s, v) for s, v in choices])


def story_shapes(choices: Sequence[tuple[str, str]]) -> list[str]:
    """Ids (keys of ``SENTENCE_SHAPES``) of the sentence shapes a choice sequence uses, in order."""
    shapes: list[str] = []
    _replay(choices, shapes)
    return shapes


def _parses(text: str, forced: list[tuple[str, str]], out: list[list[tuple[str, str]]]) -> None:
    """Append to ``out`` every complete choice list that starts with ``forced`` and writes ``text``.

    Runs the program, checking each piece of text against ``text`` as soon as it is written.  At a
    choice, the values whose surface matches (or all values, for choices that write nothing) are
    candidates; one candidate is followed directly, several are each explored by re-running the
    program with that choice forced.  Exhaustive, so an ambiguous text yields several parses.
    """
    program = _story_program()
    pos = 0
    chosen: list[tuple[str, str]] = []
    request = next(program)
    try:
        while True:
            if isinstance(request, str):
                if not text.startswith(request, pos):
                    return
                pos += len(request)
                request = program.send(None)
                continue
            if len(chosen) < len(forced):
                value = forced[len(chosen)][1]
            else:
                if request.surface is None:
                    candidates = list(request.dist.values)
                else:
                    candidates = [
                        v for v in request.dist.values if text.startswith(request.surface[v], pos)
                    ]
                if not candidates:
                    return
                if len(candidates) > 1:
                    for value in candidates:
                        _parses(text, chosen + [(request.slot, value)], out)
                    return
                value = candidates[0]
            if request.surface is not None:
                if not text.startswith(request.surface[value], pos):
                    return
                pos += len(request.surface[value])
            chosen.append((request.slot, value))
            request = program.send(value)
    except StopIteration:
        if pos == len(text):
            out.append(chosen)


def parse_story(text: str) -> list[tuple[str, str]]:
    """Recover the exact choices that wrote ``text``; ValueError if it is not exactly one story."""
    found: list[list[tuple[str, str]]] = []
    _parses(text, [], found)
    if not found:
        raise ValueError(f"not a valid story: {text[:80]!r}")
    if len(found) > 1:  # cannot happen for this grammar (tested); refuse rather than guess
        raise ValueError(f"ambiguous story ({len(found)} parses): {text[:80]!r}")
    return found[0]


def describe(seed: int = 0, n_stories: int = 2000) -> dict[str, object]:
    """Inventory sizes and measured statistics over a sample, for the docs."""
    stories = []
    for story in generate_stories(seed, 1 << 62):
        stories.append(story)
        if len(stories) >= n_stories:
            break
    lengths = [len(s.text) for s in stories]
    nats = sum(-s.logprob for s in stories)
    shapes: set[str] = set()
    for s in stories:
        shapes.update(story_shapes(s.choices))
    return {
        "names": len(NAMES),
        "objects": len(OBJECTS),
        "places": len(PLACES),
        "actions": len(ACTIONS),
        "colors": len(COLORS),
        "weathers": len(WEATHERS),
        "sentence_shapes": len(SENTENCE_SHAPES),
        "sentence_shapes_seen": len(shapes),
        "sample_stories": len(stories),
        "mean_chars": sum(lengths) / len(lengths),
        "min_chars": min(lengths),
        "max_chars": max(lengths),
        "mean_nats_per_story": nats / len(stories),
        "nats_per_char": nats / sum(lengths),
        # One end-of-text token per story under a character tokenizer: what the floor divides by.
        "nats_per_char_with_eot": nats / (sum(lengths) + len(stories)),
        "mean_qa_pairs": sum(len(s.qa) for s in stories) / len(stories),
    }
