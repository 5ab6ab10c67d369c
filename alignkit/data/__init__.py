"""Datasets: readers, record formats, tokenisation with loss masks, packing, collators and batch iteration."""

from alignkit.data.collate import (
    Batch,
    PreferenceBatch,
    SharedPromptBatch,
    pack_examples,
    packed_collate,
    pad_collate,
    preference_collate,
    shared_prompt_collate,
    shifted_labels,
)
from alignkit.data.formats import (
    PreferencePair,
    VerifiablePrompt,
    detect_format,
    extract_gsm8k_answer,
    parse_hh_transcript,
    preference_to_pair,
    verifiable_prompts,
)
from alignkit.data.readers import load_records
from alignkit.data.tokenize import PreferenceExample, TokenizedExample, tokenize_dataset, tokenize_preferences

__all__ = [
    "Batch",
    "PreferenceBatch",
    "PreferenceExample",
    "PreferencePair",
    "SharedPromptBatch",
    "TokenizedExample",
    "VerifiablePrompt",
    "detect_format",
    "extract_gsm8k_answer",
    "load_records",
    "pack_examples",
    "packed_collate",
    "pad_collate",
    "parse_hh_transcript",
    "preference_collate",
    "preference_to_pair",
    "shared_prompt_collate",
    "shifted_labels",
    "tokenize_dataset",
    "tokenize_preferences",
    "verifiable_prompts",
]
