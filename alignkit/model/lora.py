"""LoRA adapters for the Llama-family model, stored in `peft`'s file format.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) freezes a pretrained weight W [out, in] and learns a
low-rank update: y = x W^T + b + scaling * (dropout(x) A^T) B^T, with A [r, in], B [out, r], r << in, out.
B starts at zero, so training starts exactly at the base model. `scaling` is alpha / r, or alpha / sqrt(r) with
rsLoRA (Kalajdzievski 2023), which keeps the update's magnitude stable as r grows.

`LoRALinear` subclasses `nn.Linear` and keeps the base `weight` / `bias` under their own names, so a wrapped
model's state_dict still has `model.layers.0.self_attn.q_proj.weight` and the adapter adds
`...q_proj.lora_A.weight` / `...q_proj.lora_B.weight`. A saved adapter is a `peft` adapter directory
(`adapter_config.json` + `adapter_model.safetensors`, keys prefixed `base_model.model.`), so adapters move
between alignkit, `peft` and `transformers` unchanged.

The base weights exist once: `disable_adapters(model)` turns the LoRA paths off, which is how DPO gets its frozen
reference model without a second copy of the weights.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from alignkit.errors import CheckpointError, ConfigError

# The Linear layers of a decoder layer, in the order they run; "all-linear" means all of them (never lm_head or
# the score head, which are output layers: train those fully with `modules_to_save`).
DECODER_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# peft wraps the model twice (PeftModel -> LoraModel -> the HF model); saved keys carry both wrappers' prefixes.
PEFT_PREFIX = "base_model.model."
# LoraConfig options that change the math; an adapter that turns any of them on cannot load here.
UNSUPPORTED_OPTIONS = {
    "use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "bias": "none", "use_qalora": False,
    "target_parameters": None, "trainable_token_indices": None, "layer_replication": None,
}

ModelT = TypeVar("ModelT", bound=nn.Module)


class LoRALinear(nn.Linear):
    """An `nn.Linear` (frozen base `weight`, `bias`) plus a trainable low-rank update B @ A scaled by `scaling`.

    Initialised as `peft` does by default: A kaiming-uniform(a=sqrt(5)) (nn.Linear's own init), B zeros.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if rank <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer; got {rank}.")
        self.rank = rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        # peft keeps adapters in fp32 over a half-precision base (its `autocast_adapter_dtype` default) so the
        # optimizer updates small LoRA weights at full precision.
        lora_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=lora_dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=lora_dtype)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self.merged = False
        self.reset_lora_parameters()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False
    ) -> LoRALinear:
        """Wrap an existing Linear, reusing its weight and bias Parameters (no copy, no new base memory)."""
        weight = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, rank=rank, alpha=alpha, dropout=dropout,
            use_rslora=use_rslora, bias=linear.bias is not None, device="meta", dtype=weight.dtype,
        )
        layer.weight = weight
        layer.bias = linear.bias
        layer.lora_A.to_empty(device=weight.device)
        layer.lora_B.to_empty(device=weight.device)
        layer.reset_lora_parameters()
        layer.train(linear.training)
        return layer

    def reset_lora_parameters(self) -> None:
        # A as nn.Linear's default (bound 1/sqrt(in_features)); B = 0 so the wrapped layer starts as the base.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A [out, in], in fp32: what merging adds to `weight`."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.disabled or self.merged:
            return out
        lora_in = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return out + (self.lora_B(self.lora_A(lora_in)) * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into `weight` in place (faster inference; undo with `unmerge`)."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding this layer's (merged or not) weight and bias Parameters."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        linear.train(self.training)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"


# ---------------------------------------------------------------------------------------------- applying LoRA


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in the model, by module name (`model.layers.0.self_attn.q_proj`, ...)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers inside the decoder layers: the modules LoRA may target."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
        and name.startswith("model.layers.") and name.rsplit(".", 1)[-1] in DECODER_LINEAR_NAMES
    }


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _resolve_modules_to_save(model: nn.Module, names: Sequence[str], *, strict: bool) -> list[str]:
    """Full module names for `names`, each matched like peft: the module's name or its last dotted parts."""
    resolved: list[str] = []
    for wanted in names:
        hits = [n for n, _ in model.named_modules() if n and (n == wanted or n.endswith("." + wanted))]
        if not hits and strict:
            top = ", ".join(n for n, _ in model.named_children())
            raise ConfigError(
                f"modules_to_save names {wanted!r}, which is not a module of {type(model).__name__} "
                f"(top-level modules: {top}); use e.g. 'score' for a reward model's head."
            )
        resolved.extend(hits)
    return resolved


def _inject(
    model: nn.Module,
    ranks: dict[str, tuple[int, float]],
    *,
    dropout: float,
    use_rslora: bool,
    modules_to_save: list[str],
) -> None:
    """Replace the named Linears by LoRALinears (rank, alpha per module), freeze everything else."""
    if lora_layers(model):
        raise ConfigError(
            f"{type(model).__name__} already has LoRA layers; apply or load an adapter on a model without one "
            "(merge_lora() first to stack a second adapter on top of the first)."
        )
    for param in model.parameters():
        param.requires_grad_(False)
    linears = _decoder_linears(model)
    for name, (rank, alpha) in ranks.items():
        layer = LoRALinear.from_linear(linears[name], rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        _set_submodule(model, name, layer)
    for name in modules_to_save:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    # Plain attribute (not a buffer): which fully trained modules belong to the adapter when it is saved.
    model.lora_modules_to_save = tuple(modules_to_save)  # type: ignore[assignment]


def apply_lora(
    model: ModelT,
    *,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj"),
    use_rslora: bool = False,
    modules_to_save: Sequence[str] | None = None,
) -> ModelT:
    """Add LoRA to `target_modules` of every decoder layer, in place, and freeze every other parameter.

    `target_modules` is a list of names from DECODER_LINEAR_NAMES or "all-linear" (all seven; never lm_head).
    `modules_to_save` lists modules trained fully and saved with the adapter; None means ["score"] for a model
    with a score head (a reward model's new head must learn) and nothing otherwise, as peft does for SEQ_CLS.
    """
    if isinstance(target_modules, str):
        target_modules = DECODER_LINEAR_NAMES if target_modules == ALL_LINEAR else (target_modules,)
    unknown = [t for t in target_modules if t not in DECODER_LINEAR_NAMES]
    if unknown:
        raise ConfigError(
            f"LoRA target module {unknown[0]!r} is not a Linear layer of the decoder; valid target_modules are "
            f"{', '.join(DECODER_LINEAR_NAMES)}, or '{ALL_LINEAR}' for all of them."
        )
    if not target_modules:
        raise ConfigError(f"LoRA target_modules is empty; name at least one of {', '.join(DECODER_LINEAR_NAMES)}.")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"LoRA dropout must be in [0, 1); got {dropout}.")
    if modules_to_save is None:
        modules_to_save = ["score"] if isinstance(getattr(model, "score", None), nn.Module) else []
    to_save = _resolve_modules_to_save(model, modules_to_save, strict=True)
    targets = {name: (rank, alpha) for name in _decoder_linears(model) if name.rsplit(".", 1)[-1] in target_modules}
    _inject(model, targets, dropout=dropout, use_rslora=use_rslora, modules_to_save=to_save)
    return model


def _require_lora(model: nn.Module, what: str) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ConfigError(f"{what}: {type(model).__name__} has no LoRA layers; call apply_lora() or load_adapter() first.")
    return layers


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: inside the block every LoRA path is off (DPO's reference model, with no weight copy).

    Modules in `modules_to_save` are trained in place, so they keep their trained values here.
    """
    layers = _require_lora(model, "disable_adapters")
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ConfigError(f"disable_adapters: LoRA layer {merged[0]} is merged into its weight; unmerge() it first.")
    previous = {name: layer.disabled for name, layer in layers.items()}
    for layer in layers.values():
        layer.disabled = True
    try:
        yield model
    finally:
        for name, layer in layers.items():
            layer.disabled = previous[name]


@torch.no_grad()
def merge_lora(model: ModelT) -> ModelT:
    """Fold every adapter into its base weight and turn the model back into a plain one, in place.

    The result has the base model's module types and state_dict keys, and every parameter trainable again;
    its outputs equal the adapted model's up to fp rounding (the update is computed in fp32).
    """
    for name, layer in _require_lora(model, "merge_lora").items():
        layer.merge()
        _set_submodule(model, name, layer.to_linear())
    for param in model.parameters():
        param.requires_grad_(True)
    if hasattr(model, "lora_modules_to_save"):
        del model.lora_modules_to_save
    return model


def _adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    layers = _require_lora(model, "the adapter")
    saved = getattr(model, "lora_modules_to_save", ())
    prefixes = tuple(f"{name}.lora_{ab}." for name in layers for ab in "AB") + tuple(f"{name}." for name in saved)
    return {name: p for name, p in model.named_parameters() if name.startswith(prefixes)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer trains: every lora_A / lora_B weight, plus the parameters of `modules_to_save`."""
    return list(_adapter_parameters(model).values())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the model's own keys (`model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    return {name: p.detach() for name, p in _adapter_parameters(model).items()}


# ---------------------------------------------------------------------------------------------- peft file format


def _task_type(model: nn.Module) -> str:
    from alignkit.model.llama import LlamaForScore

    return "SEQ_CLS" if isinstance(model, LlamaForScore) else "CAUSAL_LM"


def adapter_config(model: nn.Module, *, base_model_name_or_path: str) -> dict[str, Any]:
    """The `adapter_config.json` dict (peft LoraConfig fields) that describes this model's adapter."""
    layers = _require_lora(model, "adapter_config")
    # Short names when the adapter covers every layer (portable, what users write); otherwise the exact modules.
    short = sorted({name.rsplit(".", 1)[-1] for name in layers}, key=DECODER_LINEAR_NAMES.index)
    covered = {n for n in _decoder_linears(model) | layers if n.rsplit(".", 1)[-1] in short}
    target_modules = short if covered == set(layers) else sorted(layers)
    # The most common (rank, alpha) is the default; other modules go to rank_pattern / alpha_pattern by full name.
    rank, _ = Counter(layer.rank for layer in layers.values()).most_common(1)[0]
    alpha, _ = Counter(layer.alpha for layer in layers.values()).most_common(1)[0]
    first = next(iter(layers.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target_modules,
        "rank_pattern": {name: layer.rank for name, layer in layers.items() if layer.rank != rank},
        "alpha_pattern": {name: layer.alpha for name, layer in layers.items() if layer.alpha != alpha},
        "use_rslora": first.use_rslora,
        "modules_to_save": list(getattr(model, "lora_modules_to_save", ())) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "lora_bias": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "revision": None,
    }


def save_adapter(model: nn.Module, directory: str | os.PathLike[str], *, base_model_name_or_path: str) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` as `peft` does, atomically.

    A new directory appears whole (written under a temporary name, then renamed); into an existing directory
    each file is replaced atomically and other files there are left alone.
    """
    config = adapter_config(model, base_model_name_or_path=base_model_name_or_path)
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    from alignkit.checkpoint.files import honour_umask, save_safetensors

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        honour_umask(tmp)  # mkdtemp's 0700 would become the adapter folder's mode
        save_safetensors(tensors, tmp / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if not target.exists():
            os.replace(tmp, target)
            return
        for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
            os.replace(tmp / name, target / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_adapter_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed `adapter_config.json` of a peft adapter directory, or a CheckpointError saying what is wrong."""
    path = Path(directory) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{path} does not exist; an adapter directory holds {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME} "
            "(as written by alignkit's save_adapter or peft's save_pretrained)."
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-save the adapter.") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object of LoraConfig fields.")
    return config


def _peft_targets(config: dict[str, Any], names: list[str], modules_to_save: list[str]) -> list[str]:
    """Module names peft would wrap with LoRA: peft's `check_target_module_exists`, for LoRA options we support."""
    targets = config.get("target_modules")
    exclude = config.get("exclude_modules")
    layers = config.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]

    def matches(patterns: str | list[str] | None, key: str) -> bool:
        if not patterns:
            return False
        if isinstance(patterns, str):
            return re.fullmatch(patterns, key) is not None
        return key in patterns or any(key.endswith("." + p) for p in patterns)

    chosen = []
    for key in names:
        if matches(exclude, key) or any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save):
            continue
        if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
            hit = key.rsplit(".", 1)[-1] in DECODER_LINEAR_NAMES and key.startswith("model.layers.")
        else:
            hit = matches(targets, key)
            if hit and layers and not isinstance(targets, str):
                index = re.match(r".*?\.[^.]*\.(\d+)\.", key)
                hit = index is not None and int(index.group(1)) in layers
        if hit:
            chosen.append(key)
    return chosen


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    # peft's get_pattern_key: the first pattern that matches the end of the module name wins.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def load_adapter(model: ModelT, directory: str | os.PathLike[str]) -> ModelT:
    """Apply the LoRA adapter in a peft adapter directory (alignkit's or peft's) to `model`, in place."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    config_path = directory / ADAPTER_CONFIG_NAME
    weights_path = directory / ADAPTER_WEIGHTS_NAME
    if config.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{config_path}: peft_type is {config.get('peft_type')!r}; alignkit loads only 'LORA' adapters."
        )
    for option, default in UNSUPPORTED_OPTIONS.items():
        value = config.get(option, default)
        if value not in (None, [], {}) and value != default:
            raise CheckpointError(
                f"{config_path}: {option}={value!r} is not supported by alignkit's LoRA (expected {default!r}); "
                "merge the adapter with peft instead."
            )
    if not weights_path.is_file():
        hint = ""
        if (directory / "adapter_model.bin").is_file():
            hint = (" Only adapter_model.bin is there, a pickle that alignkit does not load; re-save it with "
                    "peft's save_pretrained(..., safe_serialization=True).")
        raise CheckpointError(f"{weights_path} does not exist.{hint}")

    to_save = _resolve_modules_to_save(model, config.get("modules_to_save") or [], strict=False)
    linears = _decoder_linears(model)
    module_names = [n for n, _ in model.named_modules() if n]
    targets = _peft_targets(config, module_names, config.get("modules_to_save") or [])
    bad = [t for t in targets if t not in linears]
    if bad:
        raise CheckpointError(
            f"{config_path}: target_modules selects {bad[0]!r}, which is not a Linear layer of a decoder layer; "
            f"alignkit's LoRA wraps only {', '.join(DECODER_LINEAR_NAMES)}."
        )
    if not targets:
        raise CheckpointError(
            f"{config_path}: target_modules {config.get('target_modules')!r} matches no module of "
            f"{type(model).__name__}; is this adapter for a different architecture?"
        )
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    ranks = {
        t: (_pattern_value(rank_pattern, t, rank), _pattern_value(alpha_pattern, t, alpha)) for t in targets
    }
    _inject(
        model, ranks, dropout=float(config.get("lora_dropout") or 0.0),
        use_rslora=bool(config.get("use_rslora", False)), modules_to_save=to_save,
    )

    expected = _adapter_parameters(model)
    tensors = load_file(str(weights_path))
    loaded: set[str] = set()
    with torch.no_grad():
        for file_key, tensor in tensors.items():
            key = file_key.removeprefix(PEFT_PREFIX)
            # peft files never name the adapter, but accept `lora_A.default.weight` from hand-made files.
            key = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
            if key not in expected:
                raise CheckpointError(
                    f"{weights_path}: tensor {file_key!r} matches no LoRA layer or modules_to_save parameter of "
                    f"{type(model).__name__} under the adapter's config; the adapter was saved for another model."
                )
            param = expected[key]
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{weights_path}: tensor {file_key!r} has shape {tuple(tensor.shape)} but the model expects "
                    f"{tuple(param.shape)}; the adapter was trained on a base model of a different size."
                )
            param.copy_(tensor)
            loaded.add(key)
    missing = sorted(set(expected) - loaded)
    if missing:
        raise CheckpointError(
            f"{weights_path}: no tensor for {PEFT_PREFIX + missing[0]!r} ({len(missing)} missing in all), "
            "which the adapter's config says should be there; the file is incomplete."
        )
    return model
