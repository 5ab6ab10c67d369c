"""Generative tasks of `alignkit eval`: prompts (text and chat, 0 and 2 shots), the pass@k estimator, end-to-end
runs with a generator whose answers the test controls, the real engine on a tiny model, and bad input."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from alignkit.checkpoint.hf import save_hf_model
from alignkit.cli import main
from alignkit.errors import ConfigError, DataError
from alignkit.eval import generative as G
from alignkit.eval import verifiable as V
from alignkit.generation import Completion, SamplingParams
from alignkit.rewards.verifiable import answers_match
from alignkit.tokenizer import Tokenizer, train_bpe
from tests.eval.icl_helpers import char_tokenizer, tiny_model, write_jsonl

# Answers are a + b of the two numbers in the question, so a stand-in generator can compute (or miss) them.
PROBLEMS = [
    {"question": "What is 2 plus 3?", "answer": 5, "solution": "2 + 3 = 5. The answer is 5."},
    {"question": "What is 4 plus 4?", "answer": "8"},
    {"question": "What is 1 plus 6?", "answer": 7.0},
    {"question": "What is 3 plus 5?", "answer": 8},
    {"question": "What is 2 plus 2?", "answer": 4},
    {"question": "What is 7 plus 2?", "answer": 9},
    {"question": "What is 6 plus 6?", "answer": 12},
]
GSM8K_RECORD = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                "May. How many clips did Natalia sell altogether in April and May?",
                "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                "altogether in April and May.\n#### 72"}


def task_of(records: list[dict[str, object]], tmp_path: Path, name: str = "sums") -> G.GenerativeTask:
    return G.load_generative_task(str(write_jsonl(tmp_path / f"{name}.jsonl", records)))


# ---------------------------------------------------------------------------------------------- records, prompts


def test_records_give_reference_and_worked_answer(tmp_path: Path) -> None:
    task = task_of([*PROBLEMS[:3], GSM8K_RECORD], tmp_path)
    assert task.name == "sums" and task.layout == "generative" and task.check == "accuracy"
    # The record's solution when it has one, else the answer itself; numbers as written.
    assert [(d.answer, d.solution) for d in task.docs[:3]] == [
        ("5", "2 + 3 = 5. The answer is 5."), ("8", "8"), ("7.0", "7.0")]
    gsm8k = task.docs[3]
    assert gsm8k.answer == "72" and gsm8k.solution == GSM8K_RECORD["answer"] and gsm8k.line == 4


def test_text_prompts_with_0_and_2_shots(tmp_path: Path) -> None:
    task = task_of([GSM8K_RECORD, *PROBLEMS], tmp_path)
    pool, docs = task.prepare([0, 2])
    assert [d.index for d in pool] == [0, 1] and docs[0].index == 2
    assert G.text_prompt(pool, 0, docs[0]) == "Question: What is 4 plus 4?\nAnswer:"
    assert G.text_prompt(pool, 2, docs[0]) == (
        "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?\n"
        "Answer: Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
        "#### 72\n"
        "\n"
        "Question: What is 2 plus 3?\n"
        "Answer: 2 + 3 = 5. The answer is 5.\n"
        "\n"
        "Question: What is 4 plus 4?\n"
        "Answer:"
    )


def chatml_tokenizer() -> Tokenizer:
    return train_bpe([p["question"] for p in PROBLEMS] * 5 + ["The answer is 5."], vocab_size=300,
                     template="chatml")


class Recorder:
    """A stand-in for `generate`: records the prompts it gets and answers each with `answer(prompt text)`."""

    def __init__(self, tokenizer: Tokenizer, answer: object) -> None:
        self.tokenizer, self.answer = tokenizer, answer
        self.prompts: list[str] = []
        self.params: list[SamplingParams] = []

    def __call__(self, model: object, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 tokenizer: object) -> list[Completion]:
        self.params.append(params)
        out = []
        for i, ids in enumerate(prompts):
            text = self.tokenizer.decode(list(ids), skip_special_tokens=False)
            self.prompts.append(text)
            for j in range(params.n):
                out.append(Completion(i, [], [], [], "stop", self.answer(text, j)))  # type: ignore[operator]
        return out


def last_sum(prompt: str) -> int:
    """a + b of the last "What is a plus b?" in the prompt."""
    question = prompt.rsplit("What is ", 1)[1]
    a, _, b = question.split("?")[0].split()
    return int(a) + int(b)


def test_chat_prompts_render_shots_as_turns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = task_of(PROBLEMS, tmp_path)
    pool, docs = task.prepare([0, 2], limit=1)
    assert G.chat_messages(pool, 2, docs[0]) == [
        {"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."},
        {"role": "user", "content": "What is 4 plus 4?"}, {"role": "assistant", "content": "8"},
        {"role": "user", "content": "What is 1 plus 6?"},
    ]
    tokenizer = chatml_tokenizer()
    fake = Recorder(tokenizer, lambda text, j: f"The answer is {last_sum(text)}.")
    monkeypatch.setattr(V, "generate", fake)
    settings = G.GenerationSettings(prompt_format="chat")
    results = G.evaluate_generative_task(None, tokenizer, task, [0, 2], settings, limit=1)  # type: ignore[arg-type]
    assert fake.prompts == [
        "<|im_start|>user\nWhat is 1 plus 6?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n2 + 3 = 5. The answer is 5.<|im_end|>\n"
        "<|im_start|>user\nWhat is 4 plus 4?<|im_end|>\n<|im_start|>assistant\n8<|im_end|>\n"
        "<|im_start|>user\nWhat is 1 plus 6?<|im_end|>\n<|im_start|>assistant\n",
    ]
    # Chat decoding stops at the template's end of turn, not at text stop strings.
    assert all(p.stop_strings is None and p.temperature == 0 and p.n == 1 for p in fake.params)
    assert [r.metrics["acc"] for r in results] == [1.0, 1.0]
    assert results[1].samples[0]["prompt"][-1] == {"role": "user", "content": "What is 1 plus 6?"}


# ---------------------------------------------------------------------------------------------- pass@k


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """The share of the k-subsets of n samples (the first c correct) that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_hand_computed() -> None:
    assert G.pass_at_k(5, 2, 1) == pytest.approx(2 / 5)  # pass@1 is the share correct
    assert G.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert G.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5) = 11/12
    assert G.pass_at_k(5, 4, 2) == 1.0  # fewer than k wrong samples: every k-subset holds a correct one
    assert G.pass_at_k(5, 0, 5) == 0.0 and G.pass_at_k(5, 1, 5) == 1.0
    # Exact integers: no cancellation where the float product form loses digits.
    assert G.pass_at_k(200, 1, 1) == pytest.approx(1 / 200, rel=1e-12)
    with pytest.raises(ValueError, match="k <= n"):
        G.pass_at_k(3, 1, 4)


def test_pass_at_k_equals_subset_enumeration() -> None:
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert G.pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    save_hf_model(tiny_model(), tmp_path / "tiny", tokenizer=char_tokenizer())
    return tmp_path / "tiny"


def test_eval_greedy_accuracy_through_the_cli(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The stand-in answers right when the sum is even, off by one otherwise; with 2 shots the pool is records 0-1
    and the scored records are 2-6: sums 7, 8, 4, 9, 12 -> 3 of 5 right at every shot count."""
    fake = Recorder(char_tokenizer(), lambda text, j: f" {last_sum(text) + last_sum(text) % 2}")
    monkeypatch.setattr(V, "generate", fake)
    tasks = write_jsonl(tmp_path / "sums.jsonl", PROBLEMS)
    out = tmp_path / "out"
    assert main(["eval", "--model", str(model_dir), "--tasks", str(tasks), "--shots", "0,2", "--output", str(out),
                 "--batch-size", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"]["sums"]["layout"] == "generative"
    assert results["generation"]["checks"] == {"sums": "accuracy"} and results["generation"]["metrics"] == ["acc"]
    for k in ("0", "2"):
        row = results["results"]["sums"][k]
        assert row["n"] == 5 and row["acc"] == pytest.approx(0.6)
        assert row["acc_stderr"] == pytest.approx((0.6 * 0.4 / 4) ** 0.5)  # sqrt(p (1 - p) / (n - 1))
    # Text decoding: greedy, one sample, stopping at a blank line or the next question.
    assert all(p.stop_strings == ["\n\n", "Question:"] and p.temperature == 0 and p.n == 1 for p in fake.params)
    samples = [json.loads(line) for line in (out / "samples_sums_2shot.jsonl").read_text().splitlines()]
    assert [s["index"] for s in samples] == [2, 3, 4, 5, 6] and [s["line"] for s in samples] == [3, 4, 5, 6, 7]
    assert samples[0] == {
        "index": 2, "line": 3,
        "prompt": "Question: What is 2 plus 3?\nAnswer: 2 + 3 = 5. The answer is 5.\n\nQuestion: What is 4 plus 4?\n"
                  "Answer: 8\n\nQuestion: What is 1 plus 6?\nAnswer:",
        "reference": "7.0", "completions": [" 8"], "extracted": ["8"], "correct": [False], "num_correct": 0,
        "acc": 0.0,
    }
    assert [s["correct"] for s in samples] == [[False], [True], [True], [False], [True]]
    assert "| sums | acc | 0.6000 ± 0.2449 | 0.6000 ± 0.2449 | 5 |" in capsys.readouterr().out


def test_eval_sampled_pass_at_k_through_the_cli(model_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Four samples per problem; sample j of a problem is right when j < c, with c = 0, 1, 2, 4 for the four
    problems (sums 5, 8, 7, 4). pass@1 = mean(c / 4) = 0.4375; pass@2 = mean(1 - C(4 - c, 2) / C(4, 2)) =
    (0 + (1 - 3/6) + (1 - 1/6) + 1) / 4; pass@4 = 3/4 (every problem but the first has a right sample)."""
    correct_samples = {5: 0, 8: 1, 7: 2, 4: 4}
    records = [PROBLEMS[0], PROBLEMS[1], PROBLEMS[2], PROBLEMS[4]]  # sums 5, 8, 7, 4
    fake = Recorder(char_tokenizer(),
                    lambda text, j: f" {last_sum(text) + (0 if j < correct_samples[last_sum(text)] else 1)}")
    monkeypatch.setattr(V, "generate", fake)
    tasks = write_jsonl(tmp_path / "sums.jsonl", records)
    out = tmp_path / "out"
    assert main(["eval", "--model", str(model_dir), "--tasks", str(tasks), "--output", str(out), "--samples", "4",
                 "--temperature", "0.7", "--pass-k", "1,2,4", "--seed", "3", "--batch-size", "3"]) == 0
    row = json.loads((out / "results.json").read_text())["results"]["sums"]["0"]
    assert row["pass@1"] == pytest.approx(0.4375)
    assert row["pass@2"] == pytest.approx((0 + 0.5 + 5 / 6 + 1) / 4)
    assert row["pass@4"] == pytest.approx(0.75) and "acc" not in row
    # One request per chunk of 3 problems, 4 samples each, seeded by the chunk's first problem.
    assert [(p.n, p.temperature, p.seed) for p in fake.params] == [(4, 0.7, 3), (4, 0.7, 6)]
    samples = [json.loads(line) for line in (out / "samples_sums_0shot.jsonl").read_text().splitlines()]
    assert [s["num_correct"] for s in samples] == [0, 1, 2, 4] and len(samples[0]["completions"]) == 4


def test_real_engine_on_a_tiny_model(tmp_path: Path) -> None:
    """Through `generate` on a random model: every completion is cut before a stop string, and `correct` is what
    the accuracy checker says of it."""
    task = task_of(PROBLEMS, tmp_path)
    model, tokenizer = tiny_model(), char_tokenizer()
    settings = G.GenerationSettings(max_new_tokens=12, temperature=1.0, samples=3, seed=0)
    [result] = G.evaluate_generative_task(model, tokenizer, task, [1], settings, batch_size=4)
    assert result.num_items == 6 and set(result.metrics) == {"pass@1", "pass@1_stderr", "pass@3", "pass@3_stderr"}
    for sample in result.samples:
        assert len(sample["completions"]) == 3
        assert not any("\n\n" in c or "Question:" in c for c in sample["completions"])
        assert sample["correct"] == [answers_match(c, sample["reference"]) for c in sample["completions"]]
    # The same seed gives the same samples.
    [again] = G.evaluate_generative_task(model, tokenizer, task, [1], settings, batch_size=4)
    assert [s["completions"] for s in again.samples] == [s["completions"] for s in result.samples]


# ---------------------------------------------------------------------------------------------- bad input


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("alignkit eval: error: ") and not any("Traceback" in line for line in lines)
    return lines[-1]


def test_bad_input_is_a_one_line_error(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = str(write_jsonl(tmp_path / "sums.jsonl", PROBLEMS))
    base = ["eval", "--model", str(model_dir), "--output", str(tmp_path / "o")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PROBLEMS[0]) + "\n\n" + json.dumps({"question": "What is 1 plus 1?"}) + "\n")
    assert f"{bad}:3: missing 'answer'" in _error(capsys, [*base, "--tasks", str(bad)])
    assert "5 shots need 5 examples, but the shot pool holds 1" in _error(
        capsys, [*base, "--tasks", tasks, "--shots", "0,5", "--shot-pool", "1"])
    assert "leaves nothing to score" in _error(capsys, [*base, "--tasks", tasks, "--shots", "7"])
    assert "pass@5 needs at least 5 samples per problem, but --samples is 4" in _error(
        capsys, [*base, "--tasks", tasks, "--samples", "4", "--temperature", "1", "--pass-k", "1,5"])
    assert "--samples 4 at --temperature 0" in _error(capsys, [*base, "--tasks", tasks, "--samples", "4"])
    assert "a reward model gives scores" in _error(capsys, [*base, "--tasks", tasks, "--check", "rm:runs/rm"])
    assert "is not a built-in" in _error(capsys, [*base, "--tasks", tasks, "--check", "exact"])
    choices = write_jsonl(tmp_path / "qa.jsonl", [{"query": "q", "choices": ["a", "b"], "gold": 0}] * 3)
    assert "--prompt-format chat applies to generative tasks; qa" in _error(
        capsys, [*base, "--tasks", f"{tasks},{choices}", "--prompt-format", "chat"])


def test_a_checker_that_cannot_read_a_reference_names_it(tmp_path: Path) -> None:
    """The arithmetic checker reads integers only: a reference of 2.5 is a sentence, not a ValueError traceback."""
    check = G.load_check("arithmetic")
    assert check("The answer is 7.", "7") and not check("The answer is 8.", "7")
    with pytest.raises(ConfigError, match="--check arithmetic failed on the reference answer '2.5'"):
        check("The answer is 2.", "2.5")


def test_record_errors_name_file_and_line(tmp_path: Path) -> None:
    for record, message in [({"question": "", "answer": 1}, "'question' must be a non-empty string"),
                            ({"question": "q", "answer": [1]}, "'answer' must be a string or a number"),
                            ({"question": "q", "answer": "work\n#### "}, "the answer has a .####. marker but no final answer"),
                            ({"question": "q", "answer": " "}, "'answer' is empty")]:
        path = write_jsonl(tmp_path / "t.jsonl", [PROBLEMS[0], record])
        with pytest.raises(DataError, match=f"t.jsonl:2: {message}"):
            G.load_generative_task(str(path))


def test_known_names_read_the_shared_sets(shared_data: Path) -> None:
    assert G.is_generative("gsm8k") and not G.is_generative("arc_easy")
    gsm8k = G.load_generative_task("gsm8k", shared_data)
    assert len(gsm8k.docs) == 7473 and gsm8k.docs[0].answer == "72" and gsm8k.docs[0].solution.endswith("#### 72")
    mawps = G.load_generative_task("mawps_asdiv_a", shared_data)
    assert len(mawps.docs) == 3138 and mawps.docs[0].answer == "504" and mawps.docs[0].solution == "504"
    assert mawps.docs[0].question.startswith("Bryan took a look at his books as well. If Bryan has 56 books")
    with pytest.raises(DataError, match="multiarith/MultiArith.json is not in the shared data folder"):
        G.load_generative_task("multiarith", shared_data / "nowhere")


@pytest.mark.slow
def test_smollm2_on_mawps(smollm2_gguf: str, shared_data: Path, tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct, greedy, 10 mawps_asdiv_a problems at 0 and 2 shots in plain text: every sample's
    verdict is the accuracy checker's on its completion, and acc is their mean."""
    out = tmp_path / "out"
    assert main(["eval", "--model", smollm2_gguf, "--tasks", "mawps_asdiv_a", "--shots", "0,2", "--limit", "10",
                 "--data-dir", str(shared_data), "--max-new-tokens", "64", "--device", "cpu",
                 "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["results"]["mawps_asdiv_a"]
    for k in ("0", "2"):
        samples = [json.loads(line) for line in (out / f"samples_mawps_asdiv_a_{k}shot.jsonl").read_text().splitlines()]
        assert [s["index"] for s in samples] == list(range(2, 12))
        verdicts = [answers_match(s["completions"][0], s["reference"]) for s in samples]
        assert [s["correct"] for s in samples] == [[v] for v in verdicts]
        assert results[k]["acc"] == pytest.approx(sum(verdicts) / 10) and results[k]["n"] == 10
