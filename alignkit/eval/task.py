"""One model's evaluation on a task with verifiable answers and preference pairs: the rows the quickstart's
`evaluate` stage writes (and any pipeline that compares models on the same held-out data).

- a language model: greedy accuracy on held-out problems through the chat template, on training operand pairs in
  new wordings, and asked as plain text (the form pretraining saw); optionally sampled accuracy; the share of
  answers that used a wrong operation (greedy and sampled); the held-out answer loss; and preference accuracy (the model's own summed log-prob of the correct answer above the wrong one);
- a reward model: the share of held-out pairs whose chosen answer it rewards above the rejected one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from alignkit.data import load_records, pad_collate, tokenize_dataset, tokenize_preferences
from alignkit.eval.perplexity import evaluate_loss
from alignkit.eval.preference import preference_accuracy, reward_accuracy
from alignkit.eval.verifiable import verifiable_accuracy
from alignkit.tasks import arithmetic


def evaluate_language_model(
    model_dir: str | Path,
    *,
    heldout: list[Any],
    seen_pairs: list[Any],
    chat_eval: str | Path,
    preference_eval: str | Path,
    max_new_tokens: int = 24,
    batch_size: int = 64,
    max_length: int = 256,
    samples_per_problem: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One language model's evaluation row, and its sample generations on the held-out problems.

    `heldout` / `seen_pairs`: problems with a `question` and an answer checker (`alignkit.tasks`); `chat_eval`: the
    held-out chat records (answer loss); `preference_eval`: held-out pairs {prompt, chosen, rejected}. Conversations
    longer than `max_length` tokens are cut.
    """
    import alignkit

    model, tokenizer = alignkit.load(str(model_dir))
    assert tokenizer is not None
    generation = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    wrong_operation = {"wrong_operation": arithmetic.used_wrong_operation}
    held = verifiable_accuracy(model, tokenizer, heldout, tallies=wrong_operation, **generation)
    seen = verifiable_accuracy(model, tokenizer, seen_pairs, **generation)
    # The same held-out problems as plain text, the form pretraining saw (no chat template).
    text = verifiable_accuracy(model, tokenizer, heldout, prompt_format="text", **generation)
    # Sampled at `temperature` (the model's own distribution at 1): a mistake the model makes some of the time
    # counts here even when greedy decoding avoids it.
    sampled = verifiable_accuracy(model, tokenizer, heldout, temperature=temperature,
                                  samples_per_problem=samples_per_problem, seed=seed, tallies=wrong_operation,
                                  **generation) if samples_per_problem else None
    examples = tokenize_dataset(load_records(str(chat_eval)), tokenizer, format="chat", max_length=max_length)
    loss = evaluate_loss(model, [pad_collate(examples[i : i + 64], pad_id=tokenizer.pad_token_id)
                                 for i in range(0, len(examples), 64)])
    # Held-out preference accuracy with no reference model, so every language model (pretrained, SFT, DPO) is
    # measured the same way; DPO's own eval/rewards/accuracies is the version relative to its reference.
    pairs, _ = tokenize_preferences(load_records(str(preference_eval)), tokenizer, max_length=max_length,
                                    source=str(preference_eval))
    preference = preference_accuracy(model, None, pairs, pad_id=tokenizer.pad_token_id, batch_size=batch_size)
    row = {
        "accuracy/heldout": held["accuracy"], "accuracy/train_pairs": seen["accuracy"],
        "accuracy/heldout_plain_text": text["accuracy"], "accuracy/preference_heldout": preference["accuracy"],
        **({"accuracy/heldout_sampled": sampled["accuracy"]} if sampled is not None else {}),
        # Share of answers that used another operation on the problem's numbers (the sloppy annotator's mistake).
        "wrong_operation/heldout": held["shares"]["wrong_operation"],
        **({"wrong_operation/heldout_sampled": sampled["shares"]["wrong_operation"]} if sampled is not None else {}),
        "preference/logp_margin": preference["margin_mean"],
        "eval/loss": loss["loss"], "eval/perplexity": loss["perplexity"],
        "num_problems": held["num"], "num_pairs": preference["num"],
    }
    return row, held["examples"]


def evaluate_reward_model(model_dir: str | Path, *, preference_eval: str | Path, batch_size: int = 64
                          ) -> dict[str, Any]:
    """A reward model's held-out pair accuracy (reward of chosen > reward of rejected) and mean reward margin."""
    from alignkit.rewards.scoring import load_reward_model, score_conversations

    model, tokenizer = load_reward_model(model_dir)
    records = load_records(str(preference_eval))
    chosen = torch.tensor(score_conversations(model, tokenizer, [(r["prompt"], r["chosen"]) for r in records],
                                              batch_size=batch_size))
    rejected = torch.tensor(score_conversations(model, tokenizer, [(r["prompt"], r["rejected"]) for r in records],
                                                batch_size=batch_size))
    return {"accuracy/preference_heldout": reward_accuracy(chosen, rejected),
            "preference/reward_margin": float((chosen - rejected).mean()), "num_pairs": len(records)}
