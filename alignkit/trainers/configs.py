"""The config sections every training stage shares, and the configs of the pretraining and SFT stages.

Later stages (reward model, DPO, PPO, GRPO) reuse these sections and add their own. Each field's doc is the
comment directly above it; `alignkit train <stage> --help` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from alignkit.engine.config import OptimSection, TrainSection
from alignkit.errors import ConfigError


@dataclass
class ModelSection:
    # Model to start from: a Hugging Face directory, a .gguf file, or an alignkit run directory (its final/).
    path: str | None = None
    # Train from scratch: a ModelConfig as a dict (hidden_size, num_layers, ...); vocab_size defaults to the tokenizer's.
    init: dict[str, Any] | None = None
    # Dtype of the weights: float32 keeps fp32 master weights (use train.precision=bf16 for bf16 compute).
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Recompute activations in backward to save memory: true keeps only each layer's input (about 30% more
    # compute); selective also keeps the outputs of the layer's matmuls and attention and recomputes only the
    # element-wise rest (norms, RoPE, SiLU): less memory saved, no matmul run twice, but eager mode's per-op
    # overhead can eat the gain (it did on a 2-core CPU: docs/training.md).
    gradient_checkpointing: bool | Literal["selective"] = False

    def __post_init__(self) -> None:
        if self.path is not None and self.init is not None:
            raise ConfigError("model.path and model.init are both set; set path to fine-tune or init to train from scratch.")
        if self.init is not None:
            # A typo in model.init would otherwise surface only when the model is built, after the data is read.
            import dataclasses
            import difflib

            from alignkit.model.config import ModelConfig

            known = [f.name for f in dataclasses.fields(ModelConfig)]
            for key in self.init:
                if key not in known:
                    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
                    hint = f" Did you mean model.init.{close[0]}?" if close else ""
                    raise ConfigError(f"model.init.{key} is not a ModelConfig field.{hint} Valid fields: "
                                      f"{', '.join(known)}.")


@dataclass
class DataSection:
    # Training data: a .jsonl/.json/.parquet/.txt file, a folder of them, or a Hugging Face dataset name. Pretrain
    # and sft also take a list of them mixed by data.weights (domain data with general replay, say; on the command
    # line `data.train=[a.jsonl,b.jsonl]`): every example of the first source once per epoch, the others in
    # proportion, fixed by data.seed; without data.eval the held-out examples come from the first source only.
    train: str | list[str] = ""
    # Mixing weights of a data.train list, one per source (normalised to sum 1; default: equal).
    weights: list[float] | None = None
    # Held-out data in the same format; when unset, eval_fraction (or eval_size) of train is held out.
    eval: str | None = None
    # Record format: text (pretraining), instruction (instruction/input/output), chat (messages), auto (detect).
    format: Literal["auto", "text", "instruction", "chat", "preference"] = "auto"
    # Longest sequence in tokens (prompt + response); longer examples are handled by `truncation`.
    max_length: int = 512
    # Too-long examples: right (cut the end), left (cut the prompt start), drop, error, split (text only: consecutive
    # max_length chunks). null: split for raw text, right for everything else.
    truncation: Literal["right", "left", "drop", "error", "split"] | None = None
    # Pack several examples into each max_length row (documents cannot attend to each other). For preference pairs
    # (rm, dpo): pack each pair with its prompt shared; null (their default) packs on a CPU and pads on a GPU, where
    # the padded batch keeps the fused causal attention kernel and is faster for small models.
    packing: bool | None = False
    # Fraction of train held out for evaluation when `eval` is unset.
    eval_fraction: float = 0.05
    # Number of held-out examples (overrides eval_fraction when set). More than half of train (a quick run with
    # data.limit) holds out a quarter instead, with a logged note.
    eval_size: int | None = None
    # Seed of the train/eval split (the batch order uses train.seed).
    seed: int = 0
    # Use only the first `limit` records (quick experiments).
    limit: int | None = None
    # Field that holds the document in text records.
    text_field: str = "text"
    # Skip chat / instruction records that fail validation (an empty answer, a missing key; counted in the log)
    # instead of stopping at the first one. Real datasets hold a few: Code Alpaca has 2 empty outputs in 2,017.
    skip_invalid: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.train, str) and self.train.startswith("[") and self.train.endswith("]"):
            # `data.train=[a.jsonl,b.jsonl]` on the command line: a flow list, as YAML writes it.
            self.train = [s.strip().strip("'\"") for s in self.train[1:-1].split(",") if s.strip()]
        if isinstance(self.train, list):
            if len(self.train) == 1:
                self.train = self.train[0]
            elif not self.train:
                self.train = ""
        if self.weights is not None:
            from alignkit.data.mixing import normalise_weights

            normalise_weights(self.weights, len(self.sources))
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1); got {self.eval_fraction}.")
        if self.max_length < 2:
            raise ConfigError(f"data.max_length must be at least 2; got {self.max_length}.")

    @property
    def sources(self) -> list[str]:
        """data.train as a list: one source, or the several a mixture draws from."""
        return list(self.train) if isinstance(self.train, list) else [self.train]

    def single_source(self, stage: str) -> str:
        """data.train for a stage that reads one source; a ConfigError naming the stages that mix several."""
        if isinstance(self.train, list):
            raise ConfigError(f"data.train lists {len(self.train)} sources, but {stage} training reads one; mixing "
                              "several by data.weights is for pretrain and sft. Give one source.")
        return self.train


@dataclass
class LoRASection:
    # Train low-rank adapters instead of every weight.
    enabled: bool = False
    # Rank r of each adapter.
    rank: int = 16
    # Scale alpha; the adapter output is multiplied by alpha / rank.
    alpha: float = 32.0
    # Dropout on the adapter input.
    dropout: float = 0.0
    # Linear layers that get adapters (by the last part of their name).
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class EvalSection:
    # Capabilities to track at every evaluation (train.eval_every): JSONL files of held-out problems
    # {"question", "answer"}, each answered greedily and checked, logged as eval/<file name>/accuracy. A run that
    # should not forget (PPO with or without PTX, say) watches what it may lose here. Empty: off.
    tasks: list[str] = field(default_factory=list)
    # How each question is asked: chat (the chat template, as the policy is trained) or text (the bare question,
    # decoding to the end of its line: the form pretraining text had).
    prompt_format: Literal["chat", "text"] = "chat"
    # The reward function that checks an answer (a built-in, module:function or file.py:function; not rm:); an
    # answer is correct when it scores at least 1.
    check: str = "accuracy"
    # Longest answer in tokens.
    max_new_tokens: int = 32
    # Questions decoded together.
    batch_size: int = 64
    # Few-shot multiple-choice tasks to track, as `alignkit eval` scores them (a name from the shared data's
    # icl_eval folder, or a JSONL path): the log-likelihood of each choice after icl_shots solved examples, logged
    # as eval/<task>/acc (and acc_norm). What a domain-adaptation run watches for the general ability it may lose.
    icl_tasks: list[str] = field(default_factory=list)
    # Solved examples before each question (the first icl_shots records of the file, never scored).
    icl_shots: int = 5
    # Records scored per task at each evaluation (after the shot pool); null: all of them.
    icl_limit: int | None = 200

    def __post_init__(self) -> None:
        if self.icl_shots < 0 or (self.icl_limit is not None and self.icl_limit < 1):
            raise ConfigError(f"eval.icl_shots must be >= 0 and eval.icl_limit >= 1 (or null); got {self.icl_shots} "
                              f"and {self.icl_limit}.")
        if self.check.startswith("rm:"):
            raise ConfigError(f"eval.check is {self.check!r}; it checks answers against the records' `answer`, so it "
                              "must be a checker (accuracy, arithmetic, module:function), not a reward model.")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("eval.max_new_tokens and eval.batch_size must be at least 1.")


@dataclass
class StageConfig:
    """The sections every training stage has; each stage's config adds its own and may change their defaults."""

    # Model to start from: a path (HF directory, .gguf, alignkit run), or model.init to train from scratch.
    model: ModelSection = field(default_factory=ModelSection)
    # Tokenizer: a folder with tokenizer.json or a .gguf (default: the model's own); from scratch also "byte" (256
    # byte symbols + ChatML's special tokens) or "bpe:N" (a byte-level BPE of N tokens trained on data.train).
    tokenizer: str | None = None
    # Training and evaluation data.
    data: DataSection = field(default_factory=DataSection)
    # Optimizer and learning-rate schedule.
    optim: OptimSection = field(default_factory=OptimSection)
    # Batching, precision, logging, evaluation and checkpointing.
    train: TrainSection = field(default_factory=TrainSection)
    # Low-rank adapters (off by default).
    lora: LoRASection = field(default_factory=LoRASection)


@dataclass
class ChatStageConfig(StageConfig):
    """A stage that renders conversations: the sections of every stage plus the chat template."""

    # Chat template override: "llama3", "chatml", or a jinja template string (default: the tokenizer's).
    chat_template: str | None = None

    def __post_init__(self) -> None:
        if self.chat_template is not None and self.chat_template not in ("llama3", "chatml") and not (
                "{{" in self.chat_template or "{%" in self.chat_template):
            raise ConfigError(
                f"chat_template {self.chat_template!r} is neither a built-in template (llama3, chatml) nor a jinja "
                "template (with {{ ... }} or {% ... %}); name one of the built-ins or give the template's text."
            )


@dataclass
class PretrainConfig(StageConfig):
    """Causal language modelling on raw text, from scratch or continued from a checkpoint."""

    data: DataSection = field(default_factory=lambda: DataSection(format="text", truncation="split", packing=True))
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=3e-4, weight_decay=0.1, warmup_steps=10))
    # Capabilities tracked at every evaluation next to the held-out loss (checked answers, few-shot tasks).
    eval: EvalSection = field(default_factory=EvalSection)


@dataclass
class SFTConfig(ChatStageConfig):
    """Supervised fine-tuning on instruction or chat data; the loss covers assistant tokens only."""

    # Capabilities tracked at every evaluation next to the held-out loss (checked answers, few-shot tasks).
    eval: EvalSection = field(default_factory=EvalSection)
