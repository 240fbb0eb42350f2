"""Prompt sources: a list, a .txt file (one prompt a line) or a .jsonl file."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

_JSONL_KEYS = ("prompt", "text", "caption")


def load_prompts(source: str | os.PathLike | Sequence[str]) -> list[str]:
    """Return the non-empty prompts of ``source``; a clear error for an empty or unreadable source."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompt file {path!r} does not exist (expected a .txt or .jsonl file)")
        if path.endswith(".jsonl"):
            prompts = _read_jsonl(path)
        elif path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                prompts = [line.strip() for line in f]
        else:
            raise ValueError(f"prompt file {path!r} must end in .txt (one prompt a line) or .jsonl")
        where = f"prompt file {path!r}"
    else:
        if not all(isinstance(p, str) for p in source):
            raise TypeError(f"prompts must be strings, got {[type(p).__name__ for p in source][:5]}")
        prompts = [p.strip() for p in source]
        where = "the prompt list"
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{where} holds no prompt")
    return prompts


def _read_jsonl(path: str) -> list[str]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not valid JSON ({error.msg})") from None
            if isinstance(record, str):
                prompts.append(record)
                continue
            key = next((k for k in _JSONL_KEYS if isinstance(record, dict) and k in record), None)
            if key is None:
                raise ValueError(f"{path}:{number} has none of the fields {_JSONL_KEYS}")
            prompts.append(str(record[key]))
    return prompts
