"""Record formats -> messages, HH-RLHF transcript parsing, GSM8K answers, format detection."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignkit.data import (
    detect_format,
    extract_gsm8k_answer,
    load_records,
    parse_hh_transcript,
    preference_to_pair,
    verifiable_prompts,
)
from alignkit.data.formats import PreferencePair, chat_to_messages, instruction_to_messages
from alignkit.errors import DataError


def test_instruction_alpaca_style() -> None:
    with_input = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    assert instruction_to_messages(with_input) == [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"},
    ]
    without = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
    assert instruction_to_messages(without)[0] == {"role": "user", "content": "Say hi."}
    assert instruction_to_messages({"instruction": "Say hi.", "output": "Hi!"})[0]["content"] == "Say hi."


def test_instruction_missing_field_names_field_index_and_source() -> None:
    with pytest.raises(DataError, match=r"record 7 of train\.jsonl has no 'output' field"):
        instruction_to_messages({"instruction": "x"}, index=7, source="train.jsonl")


def test_chat_validation_names_record_and_key() -> None:
    good = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello", "extra": 1}]}
    assert chat_to_messages(good)[2] == {"role": "assistant", "content": "Hello"}
    bad_role = {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]}
    with pytest.raises(DataError, match=r"record 3: messages\[1\]\.role is 'bot'; use one of system, user, assistant"):
        chat_to_messages(bad_role, index=3)
    no_content = {"messages": [{"role": "user"}]}
    with pytest.raises(DataError, match=r"record 0: messages\[0\] must be an object with 'role' and 'content'"):
        chat_to_messages(no_content)
    late_system = {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                                {"role": "assistant", "content": "c"}]}
    with pytest.raises(DataError, match=r"messages\[1\] is a system message"):
        chat_to_messages(late_system)
    with pytest.raises(DataError, match="no assistant turn"):
        chat_to_messages({"messages": [{"role": "user", "content": "Hi"}]})


def test_detect_format() -> None:
    assert detect_format({"messages": []}) == "chat"
    assert detect_format({"instruction": "a", "input": "", "output": "b"}) == "instruction"
    assert detect_format({"chosen": "a", "rejected": "b"}) == "preference"
    assert detect_format({"prompt": "p", "chosen": "a", "rejected": "b"}) == "preference"
    assert detect_format({"question": "q", "answer": "a"}) == "verifiable"
    assert detect_format({"text": "t"}) == "text"
    with pytest.raises(DataError, match=r"record 2 of x\.json from its keys \['foo'\]; expected one of these key "
                                        r"sets: chat: \{messages\}; preference: \{chosen, rejected\}"):
        detect_format({"foo": 1}, index=2, source="x.json")


HH_CHOSEN = (
    "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And times 3?"
    "\n\nAssistant: 12, since 4 x 3 = 12."
)
HH_REJECTED = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And times 3?\n\nAssistant: 7."


def test_parse_hh_transcript_multi_turn() -> None:
    assert parse_hh_transcript(HH_CHOSEN) == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And times 3?"},
        {"role": "assistant", "content": "12, since 4 x 3 = 12."},
    ]
    # Consecutive turns of one speaker (a sampled response that continued) become one turn.
    merged = parse_hh_transcript("\n\nHuman: Hi\n\nAssistant: One.\n\nAssistant: Two.")
    assert merged == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "One.\n\nTwo."}]
    # "Human:" inside a turn (no blank line before it) is content, not a marker.
    assert parse_hh_transcript("\n\nHuman: say Human: hi\n\nAssistant: ok")[0]["content"] == "say Human: hi"


def test_hh_pair_shared_prefix_is_prompt() -> None:
    pair = preference_to_pair({"chosen": HH_CHOSEN, "rejected": HH_REJECTED})
    assert isinstance(pair, PreferencePair)
    assert [m["content"] for m in pair.prompt] == ["What is 2+2?", "4.", "And times 3?"]
    assert pair.chosen == [{"role": "assistant", "content": "12, since 4 x 3 = 12."}]
    assert pair.rejected == [{"role": "assistant", "content": "7."}]


def test_hh_pairs_that_cannot_be_used_give_reasons() -> None:
    other_prompt = HH_REJECTED.replace("times 3", "times 4")
    assert preference_to_pair({"chosen": HH_CHOSEN, "rejected": other_prompt}) == (
        "chosen and rejected do not share the prompt"
    )
    ends_human = HH_REJECTED + "\n\nHuman: thanks"
    assert preference_to_pair({"chosen": HH_CHOSEN, "rejected": ends_human}) == "does not end with an assistant turn"


def test_explicit_prompt_pairs() -> None:
    pair = preference_to_pair({"prompt": "Q?", "chosen": "good", "rejected": "bad"})
    assert isinstance(pair, PreferencePair)
    assert pair.prompt == [{"role": "user", "content": "Q?"}]
    assert pair.chosen == [{"role": "assistant", "content": "good"}]
    conversational = {
        "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    pair = preference_to_pair(conversational)
    assert isinstance(pair, PreferencePair) and len(pair.prompt) == 2 and pair.rejected[0]["content"] == "bad"
    with pytest.raises(DataError, match=r"record 4 has no 'rejected' field"):
        preference_to_pair({"prompt": "Q", "chosen": "a"}, index=4)


def test_real_hh_rlhf_every_pair_parses(shared_data: Path) -> None:
    records = load_records(shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz")
    pairs = [preference_to_pair(r, index=i) for i, r in enumerate(records)]
    assert all(isinstance(p, PreferencePair) for p in pairs)
    identical = sum(p.chosen == p.rejected for p in pairs if isinstance(p, PreferencePair))
    assert identical == 2  # the data README: "In 2 records chosen == rejected"
    first = pairs[0]
    assert isinstance(first, PreferencePair)
    assert first.prompt == [{"role": "user", "content": "Do you know why turkeys became the official food of thanksgiving?"}]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She has 72 clips.\n#### 72", "72"),
        ("Total cost.\n#### 1,000", "1000"),
        ("#### 1,234,567", "1234567"),
        ("He loses money.\n#### -3", "-3"),
        ("Average.\n#### 2.5", "2.5"),
        ("Price.\n#### $18.", "18"),
        ("####    42   \n", "42"),
        ("no marker here: 42", None),
        ("nothing after the marker\n####  \n", None),
    ],
)
def test_extract_gsm8k_answer_hand_cases(text: str, expected: str | None) -> None:
    assert extract_gsm8k_answer(text) == expected


def test_extract_gsm8k_answer_real_records(shared_data: Path) -> None:
    records = load_records(shared_data / "gsm8k" / "train.jsonl")[:50]
    answers = [extract_gsm8k_answer(r["answer"]) for r in records]
    assert answers[:3] == ["72", "10", "5"]  # the first three solutions end "#### 72", "#### 10", "#### 5"
    for record, answer in zip(records, answers):
        last_line = record["answer"].strip().splitlines()[-1]
        assert last_line.startswith("#### ")
        assert answer == last_line[5:].replace(",", "").strip()
        float(answer)  # every GSM8K reference is a number


def test_verifiable_prompts() -> None:
    prompts = verifiable_prompts(
        [{"question": "2+2?", "answer": "2+2=4\n#### 4"}, {"question": "1+1?", "answer": 2}],
        system_prompt="Think step by step.",
    )
    assert prompts[0].answer == "4" and prompts[1].answer == "2"
    assert prompts[0].messages == [
        {"role": "system", "content": "Think step by step."}, {"role": "user", "content": "2+2?"},
    ]
    with pytest.raises(DataError, match=r"record 0 of g\.jsonl has no 'question' field"):
        verifiable_prompts([{"q": "x", "answer": "1"}], source="g.jsonl")


def test_verifiable_prompts_from_conversations() -> None:
    """A {messages} record is a multi-turn prompt: a final assistant reply is dropped, the system prompt goes first
    unless the record has its own; it must end with a user turn."""
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "And 2+2?"}]
    [with_reply, own_system] = verifiable_prompts(
        [{"messages": [*turns, {"role": "assistant", "content": "4"}], "answer": 4},
         {"messages": [{"role": "system", "content": "Be brief."}, *turns]}],
        system_prompt="Think.", require_answer=False)
    assert with_reply.messages == [{"role": "system", "content": "Think."}, *turns] and with_reply.answer == "4"
    assert own_system.messages == [{"role": "system", "content": "Be brief."}, *turns]
    with pytest.raises(DataError, match=r"record 0 of c\.jsonl: 'messages' must end with a user turn"):
        verifiable_prompts([{"messages": turns[:2] + turns[1:2]}], source="c.jsonl", require_answer=False)
    with pytest.raises(DataError, match=r"record 0 of c\.jsonl: messages\[0\].role is 'bot'"):
        verifiable_prompts([{"messages": [{"role": "bot", "content": "x"}]}], source="c.jsonl", require_answer=False)


def test_prompt_items_give_reward_functions_the_conversation() -> None:
    from alignkit.rollout.prompts import load_prompts, reward_prompts
    from alignkit.trainers.common import load_tokenizer

    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "And 2+2?"}]
    items = load_prompts([{"question": "1+1?", "answer": 2}, {"messages": turns, "answer": 4, "topic": "math"}],
                         load_tokenizer("byte"), source="p.jsonl", max_prompt_length=512, log=False)
    assert reward_prompts(items) == ["1+1?", turns]
    assert items[1].question == "And 2+2?" and items[1].fields == {"answer": "4", "topic": "math"}
