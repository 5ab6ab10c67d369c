"""HH-RLHF splits for PPO on a learned reward, judged afterwards by a second reward model trained on other pairs.

    python -m alignkit.tasks.hh_prompts --data ../shared/data --out runs/data/hh_ppo

PPO optimises a reward model (RM-1), and optimising it hard finds answers it overrates; a win rate judged by RM-1
itself would hide that. So the answers are judged by a second reward model (RM-2, the judge) trained on pairs that
RM-1 never saw, and PPO's prompts come from pairs that neither reward model trained on. The three helpful subsets
of HH-RLHF (6,240 pairs) are split as follows:

1. **Held out (256 pairs)**: exactly the pairs `recipes/rm_smollm2_hh.yaml` holds out for eval/accuracy. The same
   reader (`read_records` on the hh-rlhf folder), the same filtering (pairs with identical chosen and rejected,
   36, and pairs that do not parse, 2, are dropped, as `tokenize_pairs` drops them; with truncation "left" no pair
   is dropped for its length) and the same `alignkit.trainers.stage.hold_out` with data.seed 0 and eval_size 256.
   Both reward models evaluate on them (`data.eval`), so their eval/accuracy is comparable with that recipe's.
2. **The other 5,946 pairs, in two halves by prompt**: a pair goes to RM-1 (`rm_ppo_pairs.jsonl`) or to RM-2
   (`rm_judge_pairs.jsonl`) by the crc32 of its normalised prompt text, so a prompt that occurs in several pairs is
   never on both sides (`alignkit.eval.winrate.normalise_prompt`: roles and contents, whitespace collapsed, case
   folded). Each half is about 2,970 pairs; the rm recipe's 80 steps of 16 pairs use 1,280, so a half costs RM-1
   nothing at that length. RM-1 keeps `recipes/rm_smollm2_hh.yaml`'s settings on its half
   (`recipes/rm_smollm2_hh_ppo.yaml`); RM-2 is the same recipe on the other half (`recipes/rm_smollm2_hh_judge.yaml`).
3. **PPO prompts (`ppo_prompts.jsonl`)**: the distinct prompts of the held-out pairs, one-turn and multi-turn, as
   `{"messages"}` records (the conversation up to the last user turn), which `alignkit.rollout.prompts.load_prompts`
   reads and whose whole conversation reaches the `rm:` reward; a prompt whose text also occurs in either half
   would be dropped (none does).
4. **Win-rate prompts (`winrate_prompts.jsonl`)**: 200 one-turn prompts drawn (seeded) from RM-1's half. PPO never
   trained on them and the judge never saw them; that RM-1 did is harmless, since RM-1 does not judge. The win rate
   on `ppo_prompts.jsonl` itself measures the prompts PPO optimised on.

`split.json` records every count. The files hold the original records (HH-RLHF transcripts for the pairs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit.data.formats import PreferencePair, preference_to_pair
from alignkit.errors import DataError, UserError
from alignkit.eval.winrate import normalise_prompt
from alignkit.trainers.common import read_records
from alignkit.trainers.configs import DataSection
from alignkit.trainers.stage import hold_out

logger = logging.getLogger(__name__)

# The data section of recipes/rm_smollm2_hh.yaml that decides its held-out pairs (tests check they agree).
HH_FOLDER = "hh-rlhf"
EVAL_SIZE = 256
SPLIT_SEED = 0
# One-turn prompts of RM-1's half drawn for the win rate, and the seed of the draw.
WINRATE_PROMPTS = 200
WINRATE_SEED = 0


@dataclass
class Pair:
    """One usable preference record: its position among the records read, the record as stored, its parsed pair,
    and its normalised prompt text."""

    index: int
    record: dict[str, Any]
    pair: PreferencePair
    key: str

    @property
    def single_turn(self) -> bool:
        return len(self.pair.prompt) == 1 and self.pair.prompt[0]["role"] == "user"


def data_section(data_dir: str | Path) -> DataSection:
    """recipes/rm_smollm2_hh.yaml's data section, as far as it decides which pairs are held out."""
    return DataSection(train=str(Path(data_dir) / HH_FOLDER), format="preference", max_length=256, truncation="left",
                       eval_size=EVAL_SIZE, seed=SPLIT_SEED)


def usable_pairs(records: Sequence[dict[str, Any]], *, source: str) -> tuple[list[Pair], dict[str, int]]:
    """The records the rm trainer keeps, in order: those that parse as a pair with different chosen and rejected
    responses (`tokenize_pairs` drops the others; under truncation "left" it drops nothing for length)."""
    pairs: list[Pair] = []
    counts = {"records": len(records), "dropped_unparsable": 0, "dropped_identical": 0}
    for index, record in enumerate(records):
        pair = preference_to_pair(record, index=index, source=source)
        if isinstance(pair, str):
            counts["dropped_unparsable"] += 1
        elif pair.chosen == pair.rejected:
            counts["dropped_identical"] += 1
        else:
            pairs.append(Pair(index, record, pair, normalise_prompt(pair.prompt)))
    counts["kept"] = len(pairs)
    return pairs, counts


def half_of(key: str) -> str:
    """"ppo" (RM-1) or "judge" (RM-2) for a normalised prompt; fixed forever (crc32, not Python's salted hash)."""
    return "ppo" if zlib.crc32(key.encode()) % 2 == 0 else "judge"


@dataclass
class Splits:
    held_out: list[Pair]
    rm_ppo: list[Pair]
    rm_judge: list[Pair]
    ppo_prompts: list[Pair]
    winrate_prompts: list[Pair]
    counts: dict[str, int]


def make_splits(data_dir: str | Path, *, winrate_prompts: int = WINRATE_PROMPTS) -> Splits:
    """Every split of the module docstring, from the shared data folder."""
    data = data_section(data_dir)
    if not Path(data.train).is_dir():
        raise DataError(f"{data.train} does not exist; pass --data, the shared data folder that holds {HH_FOLDER}/.")
    pairs, counts = usable_pairs(read_records(data.train, data), source=data.train)
    train, held_out = hold_out(pairs, data, what="pairs")
    rm_ppo = [p for p in train if half_of(p.key) == "ppo"]
    rm_judge = [p for p in train if half_of(p.key) == "judge"]
    trained_on = {p.key for p in train}
    seen: set[str] = set()
    ppo_prompts = []
    for p in held_out:
        if p.key not in trained_on and p.key not in seen:
            ppo_prompts.append(p)
            seen.add(p.key)
    candidates, keys = [], set()
    for p in rm_ppo:
        if p.single_turn and p.key not in keys:
            candidates.append(p)
            keys.add(p.key)
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(WINRATE_SEED)).tolist()
    drawn = sorted(order[:winrate_prompts])
    counts |= {"held_out": len(held_out), "rm_ppo_pairs": len(rm_ppo), "rm_judge_pairs": len(rm_judge),
               "held_out_single_turn": sum(p.single_turn for p in held_out), "ppo_prompts": len(ppo_prompts),
               "winrate_candidates": len(candidates), "winrate_prompts": len(drawn)}
    return Splits(held_out, rm_ppo, rm_judge, ppo_prompts, [candidates[i] for i in drawn], counts)


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_splits(out_dir: str | Path, data_dir: str | Path, *, winrate_prompts: int = WINRATE_PROMPTS
                 ) -> dict[str, int]:
    """Write the files of the module docstring into `out_dir`; returns the counts (also in split.json)."""
    splits = make_splits(data_dir, winrate_prompts=winrate_prompts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "heldout_pairs.jsonl", [p.record for p in splits.held_out])
    write_jsonl(out / "rm_ppo_pairs.jsonl", [p.record for p in splits.rm_ppo])
    write_jsonl(out / "rm_judge_pairs.jsonl", [p.record for p in splits.rm_judge])
    write_jsonl(out / "ppo_prompts.jsonl", [{"messages": p.pair.prompt} for p in splits.ppo_prompts])
    write_jsonl(out / "winrate_prompts.jsonl",
                [{"question": p.pair.prompt[0]["content"]} for p in splits.winrate_prompts])
    (out / "split.json").write_text(json.dumps(splits.counts, indent=1) + "\n")
    return splits.counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m alignkit.tasks.hh_prompts",
        description="Write HH-RLHF splits for PPO judged by a second reward model: the held-out pairs of "
        "recipes/rm_smollm2_hh.yaml, two prompt-disjoint halves of the rest for the PPO reward model and the judge, "
        "PPO prompts from the held-out pairs and win-rate prompts (see the module docstring).")
    parser.add_argument("--out", required=True, help="output folder (e.g. runs/data/hh_ppo)")
    parser.add_argument("--data", default=os.environ.get("ALIGNKIT_SHARED_DATA", "../shared/data"),
                        help="the shared data folder with hh-rlhf/ (default: $ALIGNKIT_SHARED_DATA, else "
                        "../shared/data)")
    parser.add_argument("--winrate-prompts", type=int, default=WINRATE_PROMPTS,
                        help=f"one-turn prompts of RM-1's half drawn for the win rate (default {WINRATE_PROMPTS})")
    args = parser.parse_args(argv)
    try:
        counts = write_splits(args.out, args.data, winrate_prompts=args.winrate_prompts)
    except UserError as e:
        print(f"hh_prompts: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
