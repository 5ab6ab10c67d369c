"""Tokenisation with loss masks (Llama 3 and ChatML templates), truncation policies, and preference pairs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from alignkit.data import (
    load_records,
    pack_examples,
    packed_collate,
    pad_collate,
    parse_hh_transcript,
    preference_collate,
    tokenize_dataset,
    tokenize_preferences,
)
from alignkit.errors import ConfigError, DataError
from alignkit.tokenizer import Tokenizer
from tests.data.conftest import small_tokenizer

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "Tell me a joke about cats."},
    {"role": "assistant", "content": "Cats sleep all day."},
]
# What each template must put inside the loss: every assistant content and its end-of-turn token (ChatML's
# template writes "\n" after <|im_end|>; the tokenizer's assistant mask counts it as part of the turn's end).
EXPECTED_TARGETS = {
    "llama3": ["Paris.<|eot_id|>", "Cats sleep all day.<|eot_id|>"],
    "chatml": ["Paris.<|im_end|>\n", "Cats sleep all day.<|im_end|>\n"],
}
ASSISTANT_HEADER = {"llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n", "chatml": "<|im_start|>assistant\n"}


def template_of(tokenizer: Tokenizer) -> str:
    return "llama3" if tokenizer.bos_token_id is not None else "chatml"


def runs(mask: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    out, start = [], None
    for i, m in enumerate([*mask, False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_multi_turn_masks_token_by_token(tokenizer: Tokenizer) -> None:
    name = template_of(tokenizer)
    [example] = tokenize_dataset([{"messages": CHAT}], tokenizer, format="chat", max_length=512)
    ids, mask = example.input_ids, example.loss_mask
    text = tokenizer.render_chat(CHAT)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    spans = runs(mask)
    # Exactly the two assistant turns, each = content + end-of-turn, each right after the assistant header.
    assert [tokenizer.decode(ids[s:e], skip_special_tokens=False) for s, e in spans] == EXPECTED_TARGETS[name]
    for s, _ in spans:
        assert tokenizer.decode(ids[:s], skip_special_tokens=False).endswith(ASSISTANT_HEADER[name])
    # Everything else (BOS, the system prompt, user turns, headers) carries no loss.
    unmasked = tokenizer.decode([t for t, m in zip(ids, mask) if not m], skip_special_tokens=False)
    assert "You are a helpful assistant." in unmasked and "What is the capital of France?" in unmasked
    assert "Paris" not in unmasked and "Cats sleep" not in unmasked

    # The collated labels (shifted) hold exactly the assistant tokens + end-of-turn, in order.
    targets = [t for t, m in zip(ids, mask) if m]
    batch = pad_collate([example], pad_id=tokenizer.pad_token_id)
    assert [t for t in batch.labels[0].tolist() if t != -100] == targets
    for s, e in spans:  # label at position t is token t+1: the header's last token predicts the first target
        assert batch.labels[0, s - 1 : e - 1].tolist() == ids[s:e]
    packed = packed_collate(pack_examples([example, example], max_length=512), max_length=512, pad_id=0)
    assert [t for t in packed.labels[0].tolist() if t != -100] == targets + targets


def test_instruction_is_completion_only(tokenizer: Tokenizer) -> None:
    name = template_of(tokenizer)
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The answer is 5."}
    [example] = tokenize_dataset([record], tokenizer, format="auto", max_length=512)
    targets = [t for t, m in zip(example.input_ids, example.loss_mask) if m]
    assert tokenizer.decode(targets, skip_special_tokens=False) == EXPECTED_TARGETS[name][0].replace(
        "Paris.", "The answer is 5."
    )
    assert "Add the numbers.\n\n2 and 3" in tokenizer.decode(example.input_ids, skip_special_tokens=False)


def test_text_format_every_token_is_a_target(tokenizer: Tokenizer) -> None:
    [example] = tokenize_dataset([{"text": "Hello there"}], tokenizer, format="text", max_length=512)
    body = tokenizer.encode("Hello there")
    bos = [tokenizer.bos_token_id] if tokenizer.add_bos_token and tokenizer.bos_token_id is not None else []
    assert example.input_ids == bos + body + [tokenizer.eos_token_id]
    assert example.loss_mask == [False] + [True] * (len(example.input_ids) - 1)  # all but the first: EOS included


def test_text_split_into_chunks() -> None:
    tok = small_tokenizer("chatml")
    ids = tok.encode("Hello there, how are you today? " * 5) + [tok.eos_token_id]
    chunks = tokenize_dataset([{"text": "Hello there, how are you today? " * 5}], tok, format="text", max_length=8,
                              truncation="split")
    assert [c.input_ids for c in chunks] == [ids[i : i + 8] for i in range(0, len(ids), 8) if len(ids[i : i + 8]) > 1]
    assert all(c.loss_mask[0] is False and all(c.loss_mask[1:]) for c in chunks)
    with pytest.raises(ConfigError, match="'split' only applies to format 'text'"):
        tokenize_dataset([{"messages": CHAT}], tok, format="chat", max_length=8, truncation="split")
    # By default raw text is chunked too (a .txt file is one long record); only an explicit "right" discards.
    default = tokenize_dataset([{"text": "Hello there, how are you today? " * 5}], tok, format="auto", max_length=8)
    assert [c.input_ids for c in default] == [c.input_ids for c in chunks]
    [cut] = tokenize_dataset([{"text": "Hello there, how are you today? " * 5}], tok, format="text", max_length=8,
                             truncation="right")
    assert cut.input_ids == ids[:8]


def test_missing_field_names_field_index_and_source(tokenizer: Tokenizer) -> None:
    records = [{"instruction": "a", "output": "b"}, {"instruction": "a", "input": ""}]
    with pytest.raises(DataError, match=r"record 1 of train\.json has no 'output' field"):
        tokenize_dataset(records, tokenizer, format="auto", max_length=64, source="train.json")
    with pytest.raises(DataError, match=r"record 0 of c\.jsonl has no 'text' field"):
        tokenize_dataset([{"body": "x"}], tokenizer, format="text", max_length=64, source="c.jsonl")
    with pytest.raises(DataError, match="holds preference pairs"):
        tokenize_dataset([{"chosen": "a", "rejected": "b"}], tokenizer, format="auto", max_length=64)


def test_truncation_error_drop_right_left(tokenizer: Tokenizer) -> None:
    short = {"messages": CHAT[:3]}
    long = {"messages": CHAT}
    [full_short] = tokenize_dataset([short], tokenizer, format="chat", max_length=512)
    [full_long] = tokenize_dataset([long], tokenizer, format="chat", max_length=512)
    limit = len(full_short)
    assert len(full_long) > limit
    with pytest.raises(DataError, match=rf"record 1 of d\.jsonl is {len(full_long)} tokens, longer than max_length {limit}"):
        tokenize_dataset([short, long], tokenizer, format="chat", max_length=limit, truncation="error", source="d.jsonl")

    stats: dict[str, int] = {}
    kept = tokenize_dataset([short, long, short], tokenizer, format="chat", max_length=limit, truncation="drop",
                            stats=stats)
    assert len(kept) == 2 and stats["dropped_too_long"] == 1 and stats["examples"] == 2

    [right] = tokenize_dataset([long], tokenizer, format="chat", max_length=limit, truncation="right")
    assert right.input_ids == full_long.input_ids[:limit] and right.loss_mask == full_long.loss_mask[:limit]

    [left] = tokenize_dataset([long], tokenizer, format="chat", max_length=limit, truncation="left")
    assert len(left) == limit
    last = runs(full_long.loss_mask)[-1]
    response = full_long.input_ids[last[0] :]
    assert left.input_ids[-len(response) :] == response  # the final response survives whole
    assert runs(left.loss_mask)[-1][1] - runs(left.loss_mask)[-1][0] == last[1] - last[0]
    if tokenizer.bos_token_id is not None:
        assert left.input_ids[0] == tokenizer.bos_token_id  # the cut keeps the leading BOS


def test_left_truncation_when_the_response_alone_is_too_long() -> None:
    """The prompt keeps its last max_length // 2 tokens (after BOS), the response (from its header) its first ones."""
    tok = small_tokenizer("llama3")
    record = {"instruction": "Tell me a joke about cats. " * 4, "output": "Cats sleep all day. " * 20}
    [full] = tokenize_dataset([record], tok, format="instruction", max_length=4096)
    messages = [{"role": "user", "content": record["instruction"]}, {"role": "assistant", "content": record["output"]}]
    header = tok.apply_chat_template(messages).message_index.index(1)  # first token of the assistant turn
    [left] = tokenize_dataset([record], tok, format="instruction", max_length=40, truncation="left")
    # 1 BOS + 19 prompt tokens (budget 39 // 2) + 20 tokens of the assistant turn
    ids = full.input_ids
    assert header - 1 > 19 and len(ids) - header > 20
    assert left.input_ids == ids[:1] + ids[header - 19 : header] + ids[header : header + 20]
    assert left.loss_mask == [False] * 20 + full.loss_mask[header : header + 20]
    assert tok.decode(left.input_ids[20:], skip_special_tokens=False).startswith(ASSISTANT_HEADER["llama3"] + "Cats")


def test_truncation_right_that_leaves_no_target_drops() -> None:
    tok = small_tokenizer("chatml")
    stats: dict[str, int] = {}
    long_prompt = {"instruction": "Tell me a joke about cats. " * 10, "output": "No."}
    kept = tokenize_dataset([long_prompt, {"instruction": "Hi", "output": "Hello"}], tok, format="instruction",
                            max_length=20, stats=stats)
    assert len(kept) == 1 and stats["dropped_no_targets"] == 1


# ---------------------------------------------------------------------------------------------------- preferences


def test_preference_ids_are_the_template_in_context(tokenizer: Tokenizer) -> None:
    records = [
        {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Rome."},
        {"prompt": "Add 2 and 3.", "chosen": "5", "rejected": "5"},  # identical: no preference
    ]
    examples, stats = tokenize_preferences(records, tokenizer, max_length=256)
    assert stats["dropped_identical"] == 1 and stats["kept"] == 1
    [ex] = examples
    prompt = [{"role": "user", "content": records[0]["prompt"]}]
    assert ex.prompt_ids == tokenizer.apply_chat_template(prompt, add_generation_prompt=True).input_ids
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "Paris."}]).input_ids
    assert ex.prompt_ids + ex.chosen_ids == full
    eot = tokenizer.eos_token_id
    assert eot in ex.chosen_ids and eot in ex.rejected_ids  # the end-of-turn is part of the response
    assert tokenizer.decode(ex.rejected_ids, skip_special_tokens=True).strip() == "Rome."
    batch = preference_collate(examples, pad_id=tokenizer.pad_token_id)
    assert [t for t in batch.labels[0].tolist() if t != -100] == ex.chosen_ids
    assert [t for t in batch.labels[1].tolist() if t != -100] == ex.rejected_ids


def test_hh_transcripts_and_strict() -> None:
    tok = small_tokenizer("llama3")
    chosen = "\n\nHuman: Hello there\n\nAssistant: Hi!\n\nHuman: How are you today?\n\nAssistant: I am fine, thank you!"
    rejected = "\n\nHuman: Hello there\n\nAssistant: Hi!\n\nHuman: How are you today?\n\nAssistant: Go away."
    broken = {"chosen": chosen, "rejected": rejected + "\n\nHuman: Why?"}
    examples, stats = tokenize_preferences([{"chosen": chosen, "rejected": rejected}, broken], tok, max_length=256)
    assert stats["kept"] == 1 and stats["dropped_unparsable"] == 1
    prompt_text = tok.decode(examples[0].prompt_ids, skip_special_tokens=False)
    assert prompt_text.count("<|start_header_id|>user") == 2 and prompt_text.endswith(ASSISTANT_HEADER["llama3"])
    with pytest.raises(DataError, match="record 1 does not end with an assistant turn"):
        tokenize_preferences([{"chosen": chosen, "rejected": rejected}, broken], tok, max_length=256, strict=True)


def test_preference_truncation() -> None:
    tok = small_tokenizer("llama3")
    record = {"prompt": "Tell me a joke about cats. " * 6, "chosen": "Cats sleep all day. " * 3, "rejected": "No."}
    [full], _ = tokenize_preferences([record], tok, max_length=4096)
    prompt_len, longest = len(full.prompt_ids), len(full.chosen_ids)

    [cut], stats = tokenize_preferences([record], tok, max_length=4096, max_prompt_length=20)
    assert len(cut.prompt_ids) == 20 and stats["truncated"] == 1
    assert cut.prompt_ids[0] == tok.bos_token_id and cut.prompt_ids[1:] == full.prompt_ids[-19:]
    assert cut.chosen_ids == full.chosen_ids

    limit = longest + 30  # room for the whole responses and the last 30 prompt tokens
    assert prompt_len > 30
    [left], _ = tokenize_preferences([record], tok, max_length=limit, truncation="left")
    assert len(left.prompt_ids) + longest == limit and left.chosen_ids == full.chosen_ids
    assert left.prompt_ids[1:] == full.prompt_ids[-29:]  # BOS, then the prompt's end

    [right], _ = tokenize_preferences([record], tok, max_length=prompt_len + 5, truncation="right")
    assert right.prompt_ids == full.prompt_ids and right.chosen_ids == full.chosen_ids[:5]

    with pytest.raises(DataError, match=rf"record 0 is {prompt_len} prompt \+ {longest} response tokens"):
        tokenize_preferences([record], tok, max_length=limit, truncation="error")
    with pytest.raises(DataError, match="no usable preference pairs"):
        tokenize_preferences([record], tok, max_length=limit, truncation="drop")


def test_real_hh_rlhf_pairs(shared_data: Path) -> None:
    records = load_records(shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz")
    tok = small_tokenizer("chatml")
    start = time.perf_counter()
    examples, stats = tokenize_preferences(records[:300], tok, max_length=100_000)
    elapsed = time.perf_counter() - start
    assert stats["dropped_unparsable"] == 0 and stats["response_fallback"] == 0
    assert stats["kept"] + stats["dropped_identical"] == 300
    kept = [r for r in records[:300] if r["chosen"] != r["rejected"]]
    for ex, record in zip(examples, kept):
        assert tok.decode(ex.prompt_ids, skip_special_tokens=False).startswith("<|im_start|>user\n")
        for key, ids in (("chosen", ex.chosen_ids), ("rejected", ex.rejected_ids)):
            last_turn = parse_hh_transcript(record[key])[-1]["content"]
            assert tok.decode(ids, skip_special_tokens=False) == last_turn + "<|im_end|>\n"
    assert elapsed < 10  # ~300 multi-turn pairs with a 400-token byte-level vocab: well under a second unloaded


@pytest.mark.slow
def test_real_hh_rlhf_all_pairs_tokenize(shared_data: Path) -> None:
    records = load_records(shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz")
    examples, stats = tokenize_preferences(records, small_tokenizer("llama3"), max_length=100_000)
    assert stats["dropped_identical"] == 2 and stats["dropped_unparsable"] == 0
    assert len(examples) == 2352


def test_real_alpaca_tokenizes(shared_data: Path) -> None:
    records = load_records(shared_data / "alpaca" / "alpaca_train_2k.json")[:200]
    tok = small_tokenizer("llama3")
    examples = tokenize_dataset(records, tok, format="auto", max_length=100_000)
    assert len(examples) == 200
    for ex, record in zip(examples, records):
        targets = tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m], skip_special_tokens=False)
        assert targets == record["output"].strip() + "<|eot_id|>"  # the Llama 3 template trims content


def test_invalid_records_stop_the_load_or_are_skipped_and_counted() -> None:
    from alignkit.errors import DataError
    from alignkit.trainers.common import load_tokenizer

    tokenizer = load_tokenizer("byte")
    records = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "  "},
               {"instruction": "d", "output": "e"}]
    with pytest.raises(DataError, match=r"record 1 of x.json: 'output' is empty.*data.skip_invalid=true"):
        tokenize_dataset(records, tokenizer, format="instruction", max_length=64, source="x.json")
    stats: dict[str, int] = {}
    kept = tokenize_dataset(records, tokenizer, format="instruction", max_length=64, source="x.json", stats=stats,
                            skip_invalid=True)
    assert len(kept) == 2 and stats["dropped_invalid"] == 1
    assert [tokenizer.decode(e.input_ids) for e in kept] == [
        tokenizer.decode(e.input_ids)
        for e in tokenize_dataset([records[0], records[2]], tokenizer, format="instruction", max_length=64)]
