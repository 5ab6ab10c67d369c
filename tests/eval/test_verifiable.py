"""verifiable_accuracy: prompts built with the chat template, greedy decoding, exact answer checks."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import pytest

from alignkit.eval import verifiable as V
from alignkit.generation import Completion, SamplingParams
from alignkit.model import LlamaForCausalLM
from alignkit.tasks import arithmetic as A
from alignkit.tokenizer import train_bpe
from tests.conftest import tiny_config


class PromptTokenizer:
    """Encodes a chat prompt as one token per message character, so the stub generator can read it back."""

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> SimpleNamespace:
        assert add_generation_prompt
        return SimpleNamespace(input_ids=[ord(c) for c in messages[-1]["content"]])

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(map(chr, ids))


def test_accuracy_with_a_known_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers right for problems whose first operand is even, off by one otherwise: accuracy = evens / all."""
    problems = A.make_problems(7, seed=5, split="heldout")
    calls: list[tuple[int, SamplingParams]] = []

    def fake_generate(model: object, prompts: list[list[int]], params: SamplingParams, *, tokenizer: object):
        calls.append((len(prompts), params))
        out = []
        for i, prompt in enumerate(prompts):
            problem = next(p for p in problems if p.question == "".join(map(chr, prompt)))
            a, b = problem.operands
            answer = problem.answer if a % 2 == 0 else problem.answer + 1
            out.append(Completion(i, [], [], [], "stop", f"{a} {problem.operation} {b} = {answer}. The answer is {answer}."))
        return out

    monkeypatch.setattr(V, "generate", fake_generate)
    result = V.verifiable_accuracy(None, PromptTokenizer(), problems, max_new_tokens=9, batch_size=3, num_examples=2)  # type: ignore[arg-type]
    evens = sum(p.operands[0] % 2 == 0 for p in problems)
    assert 0 < evens < len(problems)  # the check is not trivially all or nothing
    assert result["num"] == 7 and result["num_correct"] == evens
    assert result["accuracy"] == pytest.approx(evens / 7)
    # Batches of 3, 3, 1, each decoded greedily with the requested budget.
    assert [n for n, _ in calls] == [3, 3, 1]
    assert all(p.temperature == 0 and p.max_new_tokens == 9 and p.n == 1 for _, p in calls)
    first = result["examples"][0]
    assert len(result["examples"]) == 2
    assert first["prompt"] == problems[0].question and first["reference"] == problems[0].reference
    assert first["correct"] == (problems[0].operands[0] % 2 == 0)


def test_real_engine_on_a_random_model() -> None:
    """Through the real generation engine and chat template: an untrained model never writes "The answer is N"."""
    problems = A.make_problems(4, seed=0)
    tokenizer = train_bpe(A.as_pretraining_text(A.make_problems(50)), vocab_size=300, template="chatml")
    model = LlamaForCausalLM(tiny_config(vocab_size=tokenizer.vocab_size))
    model.init_weights()
    result = V.verifiable_accuracy(model, tokenizer, problems, max_new_tokens=4, batch_size=3)
    assert result["num"] == 4 and result["num_correct"] == 0 and result["accuracy"] == 0.0
    # A custom check sees every completion; accept everything -> accuracy 1.
    assert V.verifiable_accuracy(model, tokenizer, problems, max_new_tokens=2, is_correct=lambda c, r: True)[
        "accuracy"
    ] == 1.0


def test_plain_text_prompts_stop_at_the_line_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """prompt_format="text": the bare question, encoded without a template, and decoding stops at a newline."""
    problems = A.make_problems(2, seed=0)
    seen: list[tuple[list[list[int]], SamplingParams]] = []

    class TextTokenizer(PromptTokenizer):
        def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
            return [ord(c) for c in text]

    def fake_generate(model: object, prompts: list[list[int]], params: SamplingParams, *, tokenizer: object):
        seen.append((prompts, params))
        return [Completion(i, [], [], [], "stop", f" The answer is {problems[i].answer}.") for i in range(len(prompts))]

    monkeypatch.setattr(V, "generate", fake_generate)
    result = V.verifiable_accuracy(None, TextTokenizer(), problems, prompt_format="text")  # type: ignore[arg-type]
    assert result["accuracy"] == 1.0
    prompts, params = seen[0]
    assert prompts == [[ord(c) for c in p.question] for p in problems]
    assert params.stop_strings == ["\n"] and params.temperature == 0
    with pytest.raises(ValueError, match="prompt_format"):
        V.verifiable_accuracy(None, TextTokenizer(), problems, prompt_format="xml")  # type: ignore[arg-type]


def test_sampled_accuracy_counts_every_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three samples per problem, the first right and the other two wrong: accuracy 1/3 (pass@1 over samples);
    each chunk gets its own seed, the samples of problem i are results i * n .. i * n + n - 1."""
    problems = A.make_problems(5, seed=2, split="heldout")
    calls: list[SamplingParams] = []

    def fake_generate(model: object, prompts: list[list[int]], params: SamplingParams, *, tokenizer: object):
        calls.append(params)
        out = []
        for i, prompt in enumerate(prompts):
            problem = next(p for p in problems if p.question == "".join(map(chr, prompt)))
            for j in range(params.n):
                answer = problem.answer + (0 if j == 0 else j)
                out.append(Completion(i, [], [], [], "stop", f"The answer is {answer}."))
        return out

    monkeypatch.setattr(V, "generate", fake_generate)
    result = V.verifiable_accuracy(None, PromptTokenizer(), problems, batch_size=2, temperature=1.0,  # type: ignore[arg-type]
                                   samples_per_problem=3, seed=7)
    assert result["num"] == 5 and result["num_correct"] == 5
    assert result["accuracy"] == pytest.approx(1 / 3)
    assert [(p.n, p.temperature, p.seed) for p in calls] == [(3, 1.0, 7), (3, 1.0, 9), (3, 1.0, 11)]
    with pytest.raises(ValueError, match="samples_per_problem"):
        V.verifiable_accuracy(None, PromptTokenizer(), problems, samples_per_problem=2)  # type: ignore[arg-type]
