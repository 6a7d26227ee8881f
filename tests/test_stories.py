"""Tests for the built-in story corpus (lmforge.data.stories): grammar, floor, Q&A, determinism."""

from __future__ import annotations

import itertools
import math
import random
import re
import time

import pytest

from lmforge.data import stories as S

ALLOWED_CHARS = re.compile(r"^[A-Za-z0-9 .,!?'\n]+$")


def take(seed: int, n: int) -> list[S.Story]:
    return list(itertools.islice(S.generate_stories(seed, 1 << 40), n))


@pytest.fixture(scope="module")
def sample() -> list[S.Story]:
    return take(1234, 2500)


# --------------------------------------------------------------------------------------------------
# Determinism and sizing
# --------------------------------------------------------------------------------------------------


def test_same_seed_is_byte_identical_and_seeds_differ() -> None:
    a = [s.text for s in S.generate_stories(7, 50_000)]
    b = [s.text for s in S.generate_stories(7, 50_000)]
    c = [s.text for s in S.generate_stories(8, 50_000)]
    assert "\n".join(a).encode() == "\n".join(b).encode()
    assert a != c


def test_does_not_touch_the_global_rng() -> None:
    random.seed(99)
    expected = random.random()
    random.seed(99)
    take(3, 50)
    assert random.random() == expected


def test_stops_once_size_reached() -> None:
    size = 20_000
    lengths = [len(s.text) for s in S.generate_stories(5, size)]
    assert sum(lengths) >= size
    assert sum(lengths) - lengths[-1] < size


def test_generating_4mb_is_fast() -> None:
    start = time.perf_counter()
    total = sum(len(s.text) for s in S.generate_stories(0, 4_000_000))
    elapsed = time.perf_counter() - start
    assert total >= 4_000_000
    assert elapsed < 10.0, f"4 MB took {elapsed:.1f} s"


# --------------------------------------------------------------------------------------------------
# Richness
# --------------------------------------------------------------------------------------------------


def test_inventory_sizes() -> None:
    assert len({n for n, _ in S.NAMES}) >= 40
    assert len(set(S.OBJECTS)) >= 60
    assert len(set(S.PLACES)) >= 30
    assert len({a for a, _ in S.ACTIONS}) >= 50
    assert {g for _, g in S.NAMES} == {"f", "m"}
    # Every weather-specific action belongs to a real weather.
    weathers = {w for w, _ in S.WEATHERS}
    assert {tag for _, tag in S.ACTIONS} - {""} <= weathers


def test_inventories_are_clean_words() -> None:
    names = [n for n, _ in S.NAMES]
    # No item is a prefix of another: a tiny model never has to resolve such overlaps.
    for items in (names, list(S.OBJECTS), list(S.PLACES), list(S.COLORS)):
        for a, b in itertools.permutations(items, 2):
            assert not b.startswith(a), (a, b)
    for word in names + list(S.OBJECTS) + list(S.PLACES) + [a for a, _ in S.ACTIONS]:
        assert re.fullmatch(r"[A-Za-z ]+", word), word
    # Object nouns never appear inside a place phrase, colours are not objects.
    place_nouns = {p.split()[-1] for p in S.PLACES}
    assert not place_nouns & set(S.OBJECTS)
    assert not set(S.COLORS) & set(S.OBJECTS)


def test_sentence_shapes_produced(sample: list[S.Story]) -> None:
    seen: set[str] = set()
    for story in sample:
        shapes = S.story_shapes(story.choices)
        assert set(shapes) <= set(S.SENTENCE_SHAPES)
        seen.update(shapes)
    assert len(seen) >= 12
    assert seen == set(S.SENTENCE_SHAPES)


def test_sentence_skeletons_in_text(sample: list[S.Story]) -> None:
    """Independent of the program's own shape ids: blank out inventory words and count skeletons."""
    words = sorted(
        [n for n, _ in S.NAMES]
        + list(S.OBJECTS)
        + list(S.PLACES)
        + list(S.COLORS)
        + [a for a, _ in S.ACTIONS]
        + [w for w, _ in S.WEATHERS]
        + [n for _, n in S.WEATHERS],
        key=len,
        reverse=True,
    )
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b")
    skeletons: set[str] = set()
    for story in sample:
        for sentence in re.split(r"(?<=\.) ", story.text):
            skeletons.add(pattern.sub("_", sentence))
    assert len(skeletons) >= 12


# --------------------------------------------------------------------------------------------------
# Unambiguous grammar and exact log-probabilities
# --------------------------------------------------------------------------------------------------


def test_parse_round_trip(sample: list[S.Story]) -> None:
    for story in sample:
        choices = S.parse_story(story.text)
        assert choices == story.choices
        assert abs(S.story_logprob(choices) - story.logprob) < 1e-9
        assert story.logprob <= 0.0
        rendered = S.render_story(choices)
        assert rendered.text == story.text
        assert rendered.qa == story.qa


def test_every_choice_costs_and_logprob_is_sum_of_choices(sample: list[S.Story]) -> None:
    # The number of choices varies (structure is itself chosen), and the probability is that of the
    # whole choice list: dropping or changing one makes it invalid.
    assert len({len(s.choices) for s in sample}) > 1
    story = sample[0]
    with pytest.raises(ValueError):
        S.story_logprob(story.choices[:-1])
    with pytest.raises(ValueError):
        S.story_logprob(story.choices + [("action", "danced")])
    slot, _ = story.choices[2]
    with pytest.raises(ValueError):
        S.story_logprob(story.choices[:2] + [(slot, "Nobody")] + story.choices[3:])


def _replace_found_place(story: S.Story) -> str:
    choices = dict(story.choices)
    lost = choices["lost_place"]
    other = next(p for p in S.PLACES if p != lost)
    head, tail = story.text.split(lost + ".", 1)  # the first occurrence is the opening's
    idx = tail.index(lost + ".")  # the found sentence repeats it
    return head + lost + "." + tail[:idx] + other + "." + tail[idx + len(lost) + 1 :]


def test_mutated_stories_fail_to_parse(sample: list[S.Story]) -> None:
    known = [s for s in sample if any(slot == "lost_place" for slot, _ in s.choices)][:200]
    assert known
    for story in known:
        with pytest.raises(ValueError):
            S.parse_story(_replace_found_place(story))
    story = sample[0]
    choices = dict(story.choices)
    hero, helper = choices["hero"], choices["helper"]
    other = next(n for n, _ in S.NAMES if n not in (hero, helper))
    thanked = f"{hero} {choices['thanks']} {helper}."
    bad = [
        story.text.replace(thanked, f"{hero} {choices['thanks']} {other}."),  # wrong helper thanked
        story.text[:-1],  # truncated
        story.text + "\n",  # trailing separator
        story.text + " " + story.text,  # two stories
        story.text.replace(choices["object"], "elephant"),  # unknown word
        "",
        "Hello world.",
    ]
    for text in bad:
        with pytest.raises(ValueError):
            S.parse_story(text)


def test_searched_places_never_hold_the_object(sample: list[S.Story]) -> None:
    for story in sample:
        choices = story.choices
        searched = [v for slot, v in choices if slot == "search_place"]
        found = dict(choices).get("found_place") or dict(choices).get("lost_place")
        assert found not in searched
        assert len(set(searched)) == len(searched)


# --------------------------------------------------------------------------------------------------
# Sizes and the floor
# --------------------------------------------------------------------------------------------------


def _extreme_lengths() -> tuple[int, int]:
    """Shortest and longest possible story, by exhaustive search over the structural choices.

    Structural slots (and weather, which picks the actions, and the hero's gender, which picks the
    pronouns) are enumerated; every other slot's length adds independently, so its shortest or
    longest allowed value is enough.
    """
    enumerate_all = {"opening", "weather", "say_place", "help_shape", "search", "finder"}
    enumerate_all |= {"found_shape", "thanks", "end_shape"}
    names = [n for n, _ in S.NAMES]
    hero_options = []
    for gender in ("f", "m"):
        of_gender = [n for n, g in S.NAMES if g == gender]
        hero_options += [min(of_gender, key=len), max(of_gender, key=len)]
    assert set(hero_options) <= set(names)
    lengths: list[int] = []

    def walk(prefix: list[tuple[str, str]], mode: str) -> None:
        program = S._story_program()
        parts: list[str] = []
        i = 0
        request = next(program)
        try:
            while True:
                if isinstance(request, str):
                    parts.append(request)
                    request = program.send(None)
                    continue
                if i < len(prefix):
                    value = prefix[i][1]
                else:
                    values = list(request.dist.values)
                    if request.slot == "hero":
                        values = hero_options
                    if request.slot in enumerate_all or request.slot == "hero":
                        for v in values:
                            walk(prefix + [(request.slot, v)], mode)
                        return
                    assert request.surface is not None
                    pick = max if mode == "max" else min
                    value = pick(values, key=lambda v: len(request.surface[v]))
                    prefix = prefix + [(request.slot, value)]
                if request.surface is not None:
                    parts.append(request.surface[value])
                i += 1
                request = program.send(value)
        except StopIteration:
            lengths.append(len("".join(parts)))

    walk([], "max")
    longest = max(lengths)
    lengths.clear()
    walk([], "min")
    return min(lengths), longest


def test_lengths_within_bounds(sample: list[S.Story]) -> None:
    shortest, longest = _extreme_lengths()
    assert S.MIN_STORY_CHARS <= shortest
    assert longest <= S.MAX_STORY_CHARS <= 205
    lengths = [len(s.text) for s in sample]
    assert S.MIN_STORY_CHARS <= min(lengths) and max(lengths) <= S.MAX_STORY_CHARS
    assert 140 <= sum(lengths) / len(lengths) <= 190
    for story in sample:
        assert ALLOWED_CHARS.match(story.text)
        assert story.text == story.text.strip()


def test_entropy_per_char_in_intended_range(sample: list[S.Story]) -> None:
    nats = sum(-s.logprob for s in sample)
    chars = sum(len(s.text) for s in sample)
    per_char = nats / chars
    assert 0.14 <= per_char <= 0.22, per_char
    # Structure is random too: no story is certain, none absurdly unlikely.
    assert all(10.0 < -s.logprob < 60.0 for s in sample)


def test_distributions_are_explicit_and_normalised() -> None:
    for dist in (S._NAME_DIST, S._OBJECT_DIST, S._PLACE_DIST, S._COLOR_DIST, S._WEATHER_DIST):
        assert math.isclose(sum(math.exp(dist.logp(v)) for v in dist.values), 1.0)
    for dist in S._ACTION_DISTS.values():
        assert math.isclose(sum(math.exp(dist.logp(v)) for v in dist.values), 1.0)
    # Conditioning removes values and renormalises the rest.
    helpers = S._helpers_for("Mia")
    assert "Mia" not in helpers.values
    assert math.isclose(sum(math.exp(helpers.logp(v)) for v in helpers.values), 1.0)


def test_empirical_frequencies_match_logprob() -> None:
    # A Monte-Carlo check that sampling follows the stated distribution: the hero's empirical
    # frequency converges to exp(logp) of the first-slot distribution.
    stories = take(77, 4000)
    counts: dict[str, int] = {}
    for s in stories:
        hero = dict(s.choices)["hero"]
        counts[hero] = counts.get(hero, 0) + 1
    for name in ("Mia", "Tom", "Milo"):
        p = math.exp(S._NAME_DIST.logp(name))
        assert abs(counts.get(name, 0) / len(stories) - p) < 4 * math.sqrt(p / len(stories)) + 1e-3


# --------------------------------------------------------------------------------------------------
# Question answering
# --------------------------------------------------------------------------------------------------


def _expected_answer(question: str, choices: list[tuple[str, str]]) -> str:
    c = dict(choices)
    searched = [v for slot, v in choices if slot == "search_place"]
    his = "her" if dict(S.NAMES)[c["hero"]] == "f" else "his"
    finder = {"hero": c["hero"], "helper": c["helper"]}.get(c["finder"], "?")
    table = [
        (r"Who lost the (\w+)\?", c["hero"]),
        (r"What did (\w+) lose\?", f"{his} {c['color']} {c['object']}"),
        (r"Who helped (\w+)\?", c["helper"]),
        (r"Where was the (\w+) found\?", c.get("lost_place") or c.get("found_place")),
        (r"Where was the (\w+) lost\?", c.get("lost_place")),
        (r"What color was the (\w+)\?", c["color"]),
        (r"What was the weather like\?", c["weather"]),
        (r"What did they do at the end\?", c["action"]),
        (r"Where did they look first\?", searched[0] if searched else None),
        (r"Who found the (\w+)\?", finder),
        (r"Who did (\w+) thank\?", c["helper"]),
    ]
    for pattern, answer in table:
        m = re.fullmatch(pattern, question)
        if m:
            if m.groups():
                assert m.group(1) in (c["object"], c["hero"]), question
            assert answer is not None, question
            return answer
    raise AssertionError(f"unknown question shape: {question}")


def test_qa_answers_follow_from_text(sample: list[S.Story]) -> None:
    words = [n for n, _ in S.NAMES] + list(S.OBJECTS)
    names_and_objects = re.compile(r"\b(?:" + "|".join(words) + r")\b")
    shapes: set[str] = set()
    for story in sample:
        choices = S.parse_story(story.text)
        assert len(story.qa) >= 7
        for question, answer in story.qa:
            assert answer == _expected_answer(question, choices)
            assert answer in story.text
            assert 1 <= len(answer.split()) <= 4
            assert question.endswith("?") and ALLOWED_CHARS.match(question)
            # story + question + answer + a few chat markers fit the 256-character context.
            assert len(story.text) + len(question) + len(answer) + 6 <= 256
            shapes.add(names_and_objects.sub("_", question))
    assert len(shapes) >= 8


def test_describe() -> None:
    info = S.describe(n_stories=300)
    assert info["names"] >= 40 and info["objects"] >= 60
    assert info["places"] >= 30 and info["actions"] >= 50
    assert info["sentence_shapes"] >= 12
    assert 0.10 <= float(info["nats_per_char"]) <= 0.25  # type: ignore[arg-type]


def test_every_question_has_a_kind():
    """`lmforge eval` reports accuracy per kind: each question the generator asks has one, and
    every kind occurs."""
    kinds = set()
    for story in itertools.islice(S.generate_stories(seed=3, size_bytes=200_000), 600):
        for question, _ in story.qa:
            kind = S.question_kind(question)
            assert kind != "other", question
            kinds.add(kind)
    assert kinds == {kind for kind, _ in S.QUESTION_KINDS}
    assert S.question_kind("Who had the ball?") == "other"


# --------------------------------------------------------------------------------------------------
# The reading quiz (prepare --quiz N): exact log-probabilities, parse back, same stories
# --------------------------------------------------------------------------------------------------


def test_quiz_keeps_the_stories_and_asks_distinct_questions_with_their_answers() -> None:
    plain = list(itertools.islice(S.generate_stories(11, 1 << 40), 400))
    quizzed = list(itertools.islice(S.generate_stories(11, 1 << 40, quiz=2), 400))
    assert [s.text for s in quizzed] == [s.text for s in plain]  # the quiz has its own generator
    assert all(s.quiz == "" and s.quiz_logprob == 0.0 for s in plain)
    asked = set()
    for story in quizzed:
        lines = story.quiz.split("\n")
        assert lines[0] == "" and len(lines) == 3  # "\nQ A\nQ A"
        questions = [line.partition("? ")[0] + "?" for line in lines[1:]]
        assert len(set(questions)) == 2
        for line, question in zip(lines[1:], questions):
            assert line == f"{question} {dict(story.qa)[question]}"
        assert story.quiz_logprob == pytest.approx(-math.log(len(story.qa) * (len(story.qa) - 1)))
        assert story.document == story.text + story.quiz
        asked.update(S.question_kind(q) for q in questions)
    assert asked == {kind for kind, _ in S.QUESTION_KINDS}  # every kind of question is quizzed


def test_quiz_probabilities_sum_to_one() -> None:
    """Enumerating every quiz of a story: the probabilities of the texts sum to 1, so the quiz's
    share of the entropy floor is exact."""
    story = take(2, 1)[0]
    total = 0.0
    for order in itertools.permutations(range(len(story.qa)), 2):
        text = story.text + "".join(f"\n{story.qa[i][0]} {story.qa[i][1]}" for i in order)
        parsed = S.parse_document(text)
        assert parsed.choices == story.choices
        total += math.exp(parsed.document_logprob - story.logprob)
    assert total == pytest.approx(1.0)


def test_parse_document_round_trip_and_refusals() -> None:
    for story in itertools.islice(S.generate_stories(4, 1 << 40, quiz=3), 300):
        parsed = S.parse_document(story.document)
        assert (parsed.text, parsed.quiz, parsed.choices) == (story.text, story.quiz, story.choices)
        assert parsed.document_logprob == pytest.approx(story.document_logprob)
    story = take(4, 1)[0]
    (q1, a1), (q2, _) = story.qa[0], story.qa[1]
    for bad in (
        f"{story.text}\n{q1} {a1}x",  # wrong answer
        f"{story.text}\n{q1} {a1}\n{q1} {a1}",  # asked twice
        f"{story.text}\nWho ate the cake? Tom",  # not a question about this story
        f"{story.text}\n{q2}",  # no answer
    ):
        with pytest.raises(ValueError):
            S.parse_document(bad)
