"""Instruction data: readers, the template + loss mask, padding/packing, batching, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lmforge.chat_format import IGNORE_INDEX, ChatIds, Turn, chat_ids, render, render_prompt
from lmforge.data import instruct
from lmforge.data.instruct import (
    REFUSAL,
    SFTBatches,
    detect_format,
    load_sources,
    looks_like_instruction_data,
    pack_examples,
    pad_batch,
    render_all,
)
from lmforge.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures" / "instruct"
SHARED_DATA = Path(
    os.environ.get("LMFORGE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)


class ByteTokenizer:
    """Stand-in with lmforge's tokenizer interface: ids are UTF-8 bytes, eot 256, chat 257..260."""

    name = "byte-standin"
    vocab_size = 257
    eot_id = 256
    special_ids = {
        "<|endoftext|>": 256,
        "<|user|>": 257,
        "<|assistant|>": 258,
        "<|end|>": 259,
        "<|pad|>": 260,
    }

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


TOK = ByteTokenizer()
IDS = chat_ids(TOK)

# Every fixture, its reader's format, and the assistant replies it must train on, in order.
EXPECTED = {
    "alpaca.json": (
        "alpaca",
        [
            ["1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep well."],
            ["Le café est ouvert."],
            ["Red, blue and yellow."],
        ],
    ),
    "alpaca.jsonl": (
        "alpaca",
        [
            ["1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep well."],
            ["Le café est ouvert."],
        ],
    ),
    "squad_v1.json": ("squad", [["France"], ["10th and 11th centuries"], ["the North Sea"]]),
    "squad_v2.json": ("squad", [["France"], [REFUSAL]]),
    "dialogues.txt": (
        "dailydialog",
        [["There is one . 5 blocks away from here ?", "I'm sorry ."], ["Yes , a coffee please ."]],
    ),
    "dailydialog.jsonl": (
        "dailydialog",
        [
            ["You know that is tempting but is really not good for our fitness ."],
            ["Hello .", "Fine , thanks ."],
        ],
    ),
    "chat.jsonl": ("chat", [["4", "6"], ["Blue — like the sky."]]),
    "stories_qa.jsonl": ("stories-qa", [["Mia"], ["on the mat"]]),
}


def labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The label values grouped into runs of consecutive labelled positions."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def assert_mask_is_assistant_only(conversation, ids, labels, tokenizer=TOK):
    """Exactly the assistant content tokens + their closing <|end|> are targets, nothing else."""
    end = chat_ids(tokenizer).end
    assert len(ids) == len(labels)
    assert labels[-1] == IGNORE_INDEX
    for i, label in enumerate(labels):  # aligned: a label is always the next id
        assert label == IGNORE_INDEX or label == ids[i + 1]
    replies = [t.content for t in conversation if t.role == "assistant"]
    runs = labelled_runs(ids, labels)
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
        assert run[-1] == end
        assert run[:-1] == tokenizer.encode(reply)
        assert tokenizer.decode(run[:-1]) == reply
    assert sum(len(r) for r in runs) == sum(len(tokenizer.encode(r)) + 1 for r in replies)


# ---- readers + loss mask, per format -------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_format_reads_and_masks_only_assistant_tokens(name):
    fmt, replies = EXPECTED[name]
    path = FIXTURES / name
    assert detect_format(path) == fmt
    assert looks_like_instruction_data(path)
    conversations = instruct.READERS[fmt](path)
    assert [[t.content for t in c if t.role == "assistant"] for c in conversations] == replies
    for conversation in conversations:
        assert conversation[0].role == "user"
        ids, labels = render(conversation, TOK)
        assert_mask_is_assistant_only(conversation, ids, labels)
    # The same data through the mixing front door, and padded: padding never carries a label.
    examples = render_all(load_sources(str(path)), TOK).examples
    batch = pad_batch(examples, IDS.pad)
    padding = batch["attention_mask"] == 0
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    assert (batch["input_ids"][padding] == IDS.pad).all()
    for row, (ids, labels) in enumerate(examples):
        assert batch["input_ids"][row, : len(ids)].tolist() == ids
        assert batch["labels"][row, : len(labels)].tolist() == labels


def test_template_layout_and_user_text():
    conversations = instruct.read_alpaca(FIXTURES / "alpaca.json")
    user = conversations[1][0].content
    assert user == "Translate the sentence into French.\n\nThe café is open."
    assert conversations[0][0].content == "Give three tips for staying healthy."  # empty input
    ids, labels = render(conversations[1], TOK)
    reply = TOK.encode("Le café est ouvert.")
    assert ids == [IDS.user, *TOK.encode(user), IDS.end, IDS.assistant, *reply, IDS.end]
    assert labels == [IGNORE_INDEX] * (len(TOK.encode(user)) + 2) + reply + [IDS.end, -100]


def test_squad_user_text_references_and_refusal():
    v1 = instruct.read_squad(FIXTURES / "squad_v1.json")
    assert v1[0][0].content.endswith(
        "a region in France.\n\nQuestion: In what country is Normandy located?"
    )
    assert v1[1][1].references == ("10th and 11th centuries", "in the 10th and 11th centuries")
    v2 = instruct.read_squad(FIXTURES / "squad_v2.json")
    assert v2[1][1].content == REFUSAL == "I cannot answer that from the text."


def test_chat_system_message_goes_before_first_user_turn():
    first = instruct.read_chat(FIXTURES / "chat.jsonl")[0]
    assert [t.role for t in first] == ["user", "assistant", "user", "assistant"]
    assert first[0].content == "You are terse.\n\nWhat is 2+2?"


def test_stories_qa_user_text():
    first = instruct.read_stories_qa(FIXTURES / "stories_qa.jsonl")[0]
    assert (
        first[0].content == "Tom had a red ball. He gave it to his sister Mia.\nWho got the ball?"
    )


def test_stories_qa_questions_per_story(tmp_path: Path):
    """Grouped: every question asked once, the story only in the first turn, answers kept."""
    records = [
        {"story": story, "question": f"Q{story[-1]}{i}?", "answer": f"A{story[-1]}{i}"}
        for story, n in (("Story 1", 5), ("Story 2", 2))
        for i in range(n)
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    single = instruct.read_stories_qa(path)
    grouped = instruct.read_stories_qa(path, questions_per_story=3, seed=1)
    assert len(single) == 7 and [len(c) // 2 for c in grouped] == [3, 2, 2]
    asked = {}
    for conversation in grouped:
        story = conversation[0].content.split("\n")[0]
        assert story.startswith("Story") and all("\n" not in t.content for t in conversation[1:])
        for user, assistant in zip(conversation[::2], conversation[1::2]):
            question = user.content.split("\n")[-1]
            assert question[1:-1] == assistant.content[1:] and question[1] == story[-1]
            asked[question] = asked.get(question, 0) + 1
    assert sorted(asked) == sorted(r["question"] for r in records) and set(asked.values()) == {1}
    # the order is shuffled (seeded): not always the file's order
    firsts = {instruct.read_stories_qa(path, questions_per_story=5, seed=s)[0][0].content[-4:]
              for s in range(8)}  # fmt: skip
    assert len(firsts) > 1


def test_render_prompt_ends_with_assistant_tag():
    so_far = [Turn("user", "Hi"), Turn("assistant", "Hello"), Turn("user", "Bye?")]
    prompt = render_prompt(so_far, TOK)
    assert prompt == render(so_far, TOK)[0] + [IDS.assistant]
    assert prompt[-2:] == [IDS.end, IDS.assistant]


def test_chat_ids_fall_back_to_spare_vocabulary_ids():
    class NoSpecials(ByteTokenizer):
        special_ids = {"<|endoftext|>": 256}

    assert chat_ids(NoSpecials()) == ChatIds(257, 258, 259, 260)


def test_truncation_keeps_start_and_drops_conversations_without_targets():
    conversation = [Turn("user", "abcdef"), Turn("assistant", "xyz")]
    ids, labels = render(conversation, TOK)  # 8 user ids, then 5 assistant ids
    cut_ids, cut_labels = render(conversation, TOK, max_len=10)
    assert cut_ids == ids[:10]
    assert cut_labels == labels[:9] + [IGNORE_INDEX]  # the target of the last id was cut
    assert TOK.decode([x for x in cut_labels if x != IGNORE_INDEX]) == "x"
    rendered = render_all([conversation, [Turn("user", "a" * 20), Turn("assistant", "b")]], TOK, 10)
    assert rendered.dropped == 1 and len(rendered.examples) == 1
    assert rendered.target_tokens == 1


# ---- packing isolates examples ------------------------------------------------------------


def test_packed_logits_equal_each_example_alone():
    """lmforge's model with a packed row's position_ids and doc_ids gives each example the logits
    it has alone: no attention (or canon filter) crosses from one example into the next."""
    from lmforge.config import ModelConfig
    from lmforge.model import Transformer

    torch.manual_seed(0)
    # float64 so that equality is exact up to summation order, far below 1e-6.
    model = Transformer(ModelConfig(vocab_size=257, n_layers=2, dim=16, n_heads=2, context=64,
                                    canon=3)).double().eval()  # fmt: skip
    conversations = [
        [Turn("user", "hi"), Turn("assistant", "hello there")],
        [Turn("user", "2+2?"), Turn("assistant", "4")],
        [Turn("user", "a longer question"), Turn("assistant", "ok")],
        [Turn("user", "x"), Turn("assistant", "y")],
    ]
    examples = [render(c, TOK) for c in conversations]
    rows = pack_examples(examples, seq_len=40, pad_id=IDS.pad)
    assert len(rows) < len(examples)  # something really was packed together
    batch = {key: torch.stack([r[key] for r in rows]) for key in rows[0]}
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"],
                       doc_ids=batch["doc_ids"])  # fmt: skip
        causal_only = model(batch["input_ids"], position_ids=batch["position_ids"])
    assert not torch.isnan(packed).any()  # padding rows are never fully masked
    seen = []
    for row, r in enumerate(rows):
        for doc in range(int(r["doc_ids"].max()) + 1):
            where = (r["doc_ids"] == doc).nonzero().squeeze(1)
            ids = r["input_ids"][where]
            index = next(i for i, (e, _) in enumerate(examples) if e == ids.tolist())
            seen.append(index)
            assert r["labels"][where].tolist() == examples[index][1]
            assert r["position_ids"][where].tolist() == list(range(len(where)))
            with torch.no_grad():
                alone = model(ids[None])
            torch.testing.assert_close(packed[row, where], alone[0], atol=1e-6, rtol=0)
            if doc > 0:  # without doc_ids, later examples would see earlier ones
                assert not torch.allclose(causal_only[row, where], alone[0], atol=1e-6)
    assert sorted(seen) == list(range(len(examples)))
    padding = batch["doc_ids"] == -1
    assert (batch["labels"][padding] == IGNORE_INDEX).all()


def test_pack_truncates_long_examples_and_fills_rows():
    long = render([Turn("user", "q" * 30), Turn("assistant", "a" * 30)], TOK)
    short = render([Turn("user", "q"), Turn("assistant", "a")], TOK)
    rows = pack_examples([long, short, short], seq_len=20, pad_id=IDS.pad)
    assert all(len(r["input_ids"]) == 20 for r in rows)
    assert rows[0]["labels"][-1] == IGNORE_INDEX  # truncated: its target is gone
    assert sum(int((r["doc_ids"] >= 0).sum()) for r in rows) == 20 + 2 * len(short[0])


# ---- batches -------------------------------------------------------------------------------


def _examples(n: int) -> list:
    return [
        render([Turn("user", f"q{i}"), Turn("assistant", "a" * (i % 5 + 1))], TOK) for i in range(n)
    ]


@pytest.mark.parametrize("pack", [False, True])
def test_batches_are_deterministic_complete_and_resumable(pack):
    examples = _examples(23)
    make = lambda: SFTBatches(examples, 4, seed=7, pad_id=IDS.pad, pack=pack, seq_len=32)  # noqa: E731
    first, second = make(), make()
    n = first.batches_per_epoch
    for epoch in range(2):
        for index in range(n):
            a, b = first.batch(epoch, index), second.batch(epoch, index)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first.order(0).tolist() != first.order(1).tolist()
    assert sorted(first.order(0).tolist()) == list(range(len(first.units)))
    # get(step, micro, accum) walks the flat sequence of micro-batches across epochs.
    assert first.locate(0, 0, 3) == (0, 0)
    assert first.locate(2, 1, 3) == divmod(7, n)
    step, micro = divmod(n, 3)
    assert first.locate(step, micro, 3) == (1, 0)
    got = first.get(step, micro, 3)
    assert all(torch.equal(got[k], first.batch(1, 0)[k]) for k in got)
    if pack:
        assert set(got) == {"input_ids", "labels", "position_ids", "doc_ids"}
        assert got["input_ids"].shape[1] == 32
    else:
        assert set(got) == {"input_ids", "labels", "attention_mask"}
        tokens = sum(int(first.batch(0, i)["attention_mask"].sum()) for i in range(n))
        assert tokens == sum(len(ids) for ids, _ in examples)  # every example once per epoch
    second.load_state_dict(first.state_dict())
    other = SFTBatches(examples[:-1], 4, seed=7, pad_id=IDS.pad, pack=pack, seq_len=32)
    with pytest.raises(UserError, match="changed"):
        other.load_state_dict(first.state_dict())


# ---- mixing --------------------------------------------------------------------------------


def test_mixture_weights_and_seed():
    spec = f"{FIXTURES / 'alpaca.json'},squad:{FIXTURES / 'squad_v1.json'}"
    mixed = load_sources(spec, "2,0.34", seed=1)
    assert [s.used for s in mixed.sources] == [6, 1]  # round(2*3), round(0.34*3)
    assert [s.format for s in mixed.sources] == ["alpaca", "squad"]
    assert len(mixed) == 7
    assert load_sources(spec, "2,0.34", seed=1) == mixed
    picks = {load_sources(spec, "0,0.34", seed=s)[0][1].content for s in range(10)}
    assert len(picks) > 1  # the seed chooses which squad question


def test_folder_reads_instruction_files_and_skips_plain_text():
    mixed = load_sources(str(FIXTURES))
    assert len(mixed) == sum(len(v[1]) for v in EXPECTED.values())
    with_text = load_sources(str(FIXTURES), allow_plain_text=True)
    assert len(with_text) == len(mixed) + 2  # plain.txt's two paragraphs


# ---- errors a user can make ----------------------------------------------------------------


def _error(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_malformed_json_names_file_and_position(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(
        '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": 1}\n]'
    )
    message = _error(lambda: instruct.read_alpaca(bad))
    assert str(bad) in message and "line 3" in message
    pretty = tmp_path / "pretty.json"
    pretty.write_text('{\n  "messages": [\n    {"role": "user" "content": "hi"}\n  ]\n}\n')
    message = _error(lambda: instruct.read_chat(pretty))
    assert str(pretty) in message and "line 3" in message


def test_malformed_jsonl_line_is_reported_or_skipped(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"})
    bad.write_text(f"{good}\n{{not json\n{good}\n")
    message = _error(lambda: instruct.read_alpaca(bad))
    assert str(bad) in message and "line 2" in message and "skip_bad" in message
    read = instruct.read_alpaca(bad, skip_bad=True)
    assert len(read) == 2 and read.skipped == 1


def test_missing_answer_names_file_and_record(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    message = _error(lambda: instruct.read_alpaca(alpaca))
    assert str(alpaca) in message and "record 2" in message and "'output'" in message
    assert instruct.read_alpaca(alpaca, skip_bad=True).skipped == 1

    squad = json.loads((FIXTURES / "squad_v1.json").read_text())
    squad["data"][0]["paragraphs"][0]["qas"][1]["answers"] = []
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad))
    message = _error(lambda: instruct.read_squad(path))
    assert str(path) in message and "question 2 (id q2)" in message
    read = load_sources(str(path), skip_bad=True)
    assert len(read) == 2 and read.skipped == 1

    stories = tmp_path / "stories.jsonl"
    stories.write_text(json.dumps({"story": "s", "question": "q", "story_index": 0}) + "\n")
    assert "'answer'" in _error(lambda: instruct.read_stories_qa(stories))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert "no assistant message" in _error(lambda: instruct.read_chat(chat))


def test_empty_missing_plain_text_unknown_format_and_weights(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    assert str(empty) in _error(lambda: instruct.read_alpaca(empty))
    assert str(empty) in _error(lambda: load_sources(str(empty)))
    assert "does not exist" in _error(lambda: load_sources(str(tmp_path / "nope.jsonl")))
    plain = FIXTURES / "plain.txt"
    assert not looks_like_instruction_data(plain)
    assert "--sft.allow_plain_text=true" in _error(lambda: load_sources(str(plain)))
    text = load_sources(str(plain), allow_plain_text=True)
    assert [c[0].content for c in text] == [
        "Once upon a time there was a little fox.",
        "It lived in the woods.",
    ]
    assert "unknown data format 'csv'" in _error(lambda: load_sources(f"csv:{plain}"))
    spec = f"{FIXTURES / 'alpaca.json'},{FIXTURES / 'chat.jsonl'}"
    assert "3 weights given for 2 data sources" in _error(lambda: load_sources(spec, "1,1,1"))
    assert "numbers" in _error(lambda: load_sources(spec, "1,x"))
    unknown = tmp_path / "other.jsonl"
    unknown.write_text(json.dumps({"text": "hello"}) + "\n")
    assert "matches no instruction format" in _error(lambda: load_sources(str(unknown)))
    assert not looks_like_instruction_data(unknown)  # phase 1 may train on {"text": ...} JSONL


# ---- the real tokenizers -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["byte", "gpt2"])
def test_real_tokenizers_mask_assistant_tokens(name):
    tokenizers = pytest.importorskip("lmforge.tokenizers")
    tokenizer = tokenizers.get_tokenizer(name)
    ids = chat_ids(tokenizer)
    assert [ids.user, ids.assistant, ids.end, ids.pad] == [
        tokenizer.vocab_size + i for i in range(4)
    ]
    for name_ in sorted(EXPECTED):
        fmt = EXPECTED[name_][0]
        for conversation in instruct.READERS[fmt](FIXTURES / name_):
            assert_mask_is_assistant_only(conversation, *render(conversation, tokenizer), tokenizer)


# ---- the real public data files ------------------------------------------------------------

REAL_FILES = {
    # file under shared/data: (format, conversations, assistant replies equal to REFUSAL)
    "alpaca_excerpt/alpaca_data.json": ("alpaca", 335, None),
    "squad/dev-v1.1.json": ("squad", 10570, 0),
    "squad_v2_excerpt/dev-v2.0.json": ("squad", 706, 320),
    "dailydialog/validation/dialogues_validation.txt": ("dailydialog", 1000, None),
}


@pytest.mark.parametrize("relative", sorted(REAL_FILES))
def test_real_files_load_and_render(relative):
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} not present")
    fmt, count, refusals = REAL_FILES[relative]
    assert detect_format(path) == fmt
    conversations = load_sources(str(path))
    assert len(conversations) == count and conversations.skipped == 0
    if refusals is not None:
        assert sum(c[-1].content == REFUSAL for c in conversations) == refusals
    rendered = render_all(conversations, TOK)
    assert len(rendered.examples) == count and rendered.dropped == 0
    print(f"\n{relative}: {count} conversations, byte {rendered.tokens} tokens")
    for conversation, (ids, labels) in zip(conversations[:50], rendered.examples):
        assert_mask_is_assistant_only(conversation, ids, labels)
    tokenizers = pytest.importorskip("lmforge.tokenizers")
    gpt2 = tokenizers.get_tokenizer("gpt2")
    rendered = render_all(conversations, gpt2)
    print(
        f"\n{relative}: {count} conversations, gpt2 {rendered.tokens} tokens "
        f"({rendered.target_tokens} trained)"
    )
    for conversation, (ids, labels) in zip(conversations[:50], rendered.examples):
        assert_mask_is_assistant_only(conversation, ids, labels, gpt2)
