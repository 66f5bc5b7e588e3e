"""A model folder as onnxruntime-genai's builder writes it, read and checked.

The folder holds ``genai_config.json``, the ONNX graph (``model.onnx`` plus its
external ``model.onnx.data``), ``tokenizer.json`` and the chat template in
``tokenizer_config.json`` and/or ``chat_template.jinja``.  Everything the engine
needs to know about the graph (input/output names, head counts, eos ids,
context length) comes from ``genai_config.json``; nothing is hard-coded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_contract.errors import ModelConfigError, ModelFileError

CONFIG_FILE = "genai_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

#: Model types whose builder export is a plain decoder with GroupQueryAttention, in the order
#: the fixtures are seeded (``models.fixtures``); the DeepSeek-R1 distills are exported as
#: ``qwen2`` or ``llama``.  The one list of families: the fixtures and the tests read it here.
MODEL_FAMILIES: tuple[str, ...] = ("phi3", "llama", "mistral", "qwen2", "qwen3")
SUPPORTED_TYPES = frozenset(MODEL_FAMILIES)


class _Foreign(BaseModel):
    """A section of a file written by another tool: unknown keys are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class DecoderInputs(_Foreign):
    """Graph input names (``%d`` stands for the layer index)."""

    input_ids: str
    attention_mask: str
    past_key_names: str
    past_value_names: str
    position_ids: str | None = None


class DecoderOutputs(_Foreign):
    """Graph output names (``%d`` stands for the layer index)."""

    logits: str
    present_key_names: str
    present_value_names: str


class DecoderConfig(_Foreign):
    """The ``model.decoder`` section of ``genai_config.json``."""

    filename: str
    head_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    inputs: DecoderInputs
    outputs: DecoderOutputs

    @field_validator("filename")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if Path(value).name != value or value in ("", ".", ".."):
            raise ValueError("must be a file name inside the model folder")
        return value


class ModelSection(_Foreign):
    """The ``model`` section of ``genai_config.json``."""

    type: str
    context_length: int = Field(gt=1)
    vocab_size: int = Field(gt=0)
    bos_token_id: int | None = None
    eos_token_id: int | list[int]
    pad_token_id: int | None = None
    decoder: DecoderConfig

    @field_validator("type")
    @classmethod
    def _supported(cls, value: str) -> str:
        if value not in SUPPORTED_TYPES:
            raise ValueError(
                f"model type {value!r} is not supported (supported: {', '.join(sorted(SUPPORTED_TYPES))})"
            )
        return value


class GenaiConfig(_Foreign):
    """The parts of ``genai_config.json`` the engine relies on."""

    model: ModelSection
    search: dict[str, Any] = Field(default_factory=dict)


class ModelFolder:
    """A checked model folder: paths, parsed config and chat template source."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelFileError(self.path, "model folder not found")
        self.config = _read_config(self.path / CONFIG_FILE)
        self.onnx_path = self.path / self.config.model.decoder.filename
        _require_file(self.onnx_path)
        _require_file(self.path / TOKENIZER_FILE)
        self.tokenizer_path = self.path / TOKENIZER_FILE
        self.tokenizer_config = _read_json(self.path / TOKENIZER_CONFIG_FILE, required=False)
        self.chat_template = self._find_chat_template()

    @property
    def name(self) -> str:
        """The folder's name, used as the model's name when nothing better is known."""
        return self.path.resolve().name

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Token ids that end generation."""
        eos = self.config.model.eos_token_id
        return tuple(eos) if isinstance(eos, list) else (eos,)

    @property
    def context_length(self) -> int:
        """Longest sequence (prompt + generated) the model accepts."""
        return self.config.model.context_length

    def _find_chat_template(self) -> str | None:
        template_file = self.path / CHAT_TEMPLATE_FILE
        if template_file.is_file():
            try:
                return template_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ModelFileError(template_file, f"unreadable: {exc}") from exc
        template = (self.tokenizer_config or {}).get("chat_template")
        if isinstance(template, list):  # the named-templates form: take "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise ModelFileError(path, "missing")


def _read_json(path: Path, *, required: bool = True) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise ModelFileError(path, "missing")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(path, f"not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelFileError(path, "expected a JSON object")
    return data


def _read_config(path: Path) -> GenaiConfig:
    data = _read_json(path)
    try:
        return GenaiConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ModelConfigError(f"{path}: {problems}") from exc
