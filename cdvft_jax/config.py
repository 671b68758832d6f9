"""Adapter configuration shared by every method: which layers, which head, overrides.

Each adapter method subclasses :class:`AdapterConfig` with its own fields (see
``CDVFTConfig``) and registers under a ``method`` name, which is how a JSON file
finds its way back to the right class.

Module paths are the Flax scope paths joined with ``/``, e.g.
``roberta/encoder/layer/0/attention/self/query``.  A pattern list matches by
suffix on whole path segments (``"query"`` and ``"self/query"`` both match the
path above; ``"uery"`` does not); a single string is a regular expression that
must match the full path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from cdvft_jax.methods.base import method_spec

if TYPE_CHECKING:
    from cdvft_jax.methods.base import AdapterMethod

__all__ = [
    "ALL_LINEAR",
    "OUTPUT_HEADS",
    "AdapterConfig",
    "ModulePatterns",
    "check_dropout",
    "check_finite_number",
    "check_int",
    "check_positive_int",
    "config_from_dict",
    "config_from_json",
    "matches",
    "matches_within",
]

ModulePatterns = str | Sequence[str]
"""A regex (full match on the module path) or a list of path suffixes."""

ALL_LINEAR = "all-linear"
"""``target_modules=ALL_LINEAR`` (any letter case) adapts every linear layer outside :data:`OUTPUT_HEADS` and
``modules_to_save``.  Like peft's ``"all-linear"`` it leaves the output layer alone; unlike it, a head is left
out whole, its inner layers too (RoBERTa's ``classifier/dense``, a masked LM's ``lm_head/dense``), since a
task head is trained in full or not at all."""

OUTPUT_HEADS = ("lm_head", "classifier", "score", "qa_outputs", "predictions/decoder", "generator_lm_head")
"""The head modules :data:`ALL_LINEAR` leaves out, matched as path suffixes of a layer or of one of its
ancestors: a language model's ``lm_head``, a classifier's ``classifier`` or ``score``, a question-answering
``qa_outputs``, and the untied output layers of BERT's and ALBERT's (``predictions/decoder``) and ELECTRA's
(``generator_lm_head``) masked-LM heads."""

# Fields that choose modules; the rest may be overridden per layer.
_SELECTION_FIELDS = ("target_modules", "exclude_modules", "modules_to_save", "overrides")


def _normalize_patterns(value: ModulePatterns | None, field: str) -> str | tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"{field}: {value!r} is not a valid regular expression: {e}") from e
        return value
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{field} must be a regex string or a list of non-empty strings, got {value!r}")
    return tuple(v.replace(".", "/").strip("/") for v in value)


def matches(path: str, patterns: str | tuple[str, ...]) -> bool:
    """Whether the ``/``-joined module ``path`` is selected by ``patterns``.

    >>> matches("encoder/layer/0/attention/self/query", ("query", "value"))
    True
    >>> matches("encoder/layer/0/attention/self/query", r".*layer/1/.*query")
    False
    """
    if isinstance(patterns, str):
        return re.fullmatch(patterns, path) is not None
    return any(path == p or path.endswith("/" + p) for p in patterns)


def matches_within(path: str, patterns: str | tuple[str, ...]) -> bool:
    """Whether ``path`` or one of its ancestor paths is selected by ``patterns``.

    >>> matches_within("classifier/dense/kernel", ("classifier",))
    True
    """
    parts = path.split("/")
    return any(matches("/".join(parts[:k]), patterns) for k in range(1, len(parts) + 1))


def check_positive_int(value: Any, field: str) -> None:
    """Raises ``ValueError`` unless ``value`` is an int (not a bool) greater than zero."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field} must be a positive int, got {value!r}")


def check_int(value: Any, field: str) -> None:
    """Raises ``ValueError`` unless ``value`` is an int (not a bool), e.g. a seed."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field} must be an int, got {value!r}")


def check_finite_number(value: Any, field: str) -> None:
    """Raises ``ValueError`` unless ``value`` is a finite int or float (not a bool, NaN or an infinity)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number, got {value!r}")


def check_dropout(value: Any) -> None:
    """Raises ``ValueError`` unless ``value`` is a probability in ``[0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Fields common to every adapter method.

    Attributes:
      target_modules: the linear layers to adapt: a list of path
        suffixes, a full-match regex, or :data:`ALL_LINEAR` for every linear
        layer outside :data:`OUTPUT_HEADS` and ``modules_to_save``.
      exclude_modules: layers never adapted even if targeted (same syntax).
      modules_to_save: modules trained in full, e.g. ``["classifier"]`` for the
        task head; a parameter is in one of them when any of its ancestor
        module paths matches.  A target inside one of them is an error.
      alpha: scale of the adapter's delta.
      overrides: per-layer changes, ``{regex: {field: value}}``; the regex must
        match the full module path, and later entries win.  Any method field
        (and ``alpha``) may be overridden, the selection fields may not.
    """

    method: ClassVar[str] = ""

    target_modules: ModulePatterns
    exclude_modules: ModulePatterns = ()
    modules_to_save: ModulePatterns = ()
    alpha: float = 1.0
    overrides: Mapping[str, Mapping[str, Any]] | tuple = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise in place once
        targets = self.target_modules
        if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
            targets = ALL_LINEAR
        targets = _normalize_patterns(targets, "target_modules")
        if not targets:
            raise ValueError("target_modules is empty: name at least one layer to adapt")
        set_(self, "target_modules", targets)
        set_(self, "exclude_modules", _normalize_patterns(self.exclude_modules, "exclude_modules"))
        set_(self, "modules_to_save", _normalize_patterns(self.modules_to_save, "modules_to_save"))
        check_finite_number(self.alpha, "alpha")
        set_(self, "alpha", float(self.alpha))
        set_(self, "overrides", self._normalize_overrides(self.overrides))

    def _normalize_overrides(self, overrides: Any) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
        items = overrides.items() if isinstance(overrides, Mapping) else overrides
        allowed = {f.name for f in dataclasses.fields(self)} - set(_SELECTION_FIELDS)
        normalized = []
        for pattern, changes in items:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ValueError(f"overrides: {pattern!r} is not a valid regular expression: {e}") from e
            changes = dict(changes)
            unknown = sorted(set(changes) - allowed)
            if unknown:
                raise ValueError(
                    f"overrides[{pattern!r}]: cannot override {unknown}; allowed fields: {sorted(allowed)}"
                )
            # Validate the values now rather than at the first matching layer.
            dataclasses.replace(self, overrides=(), **changes)
            normalized.append((pattern, tuple(sorted(changes.items()))))
        return tuple(normalized)

    def layer_config(self, path: str) -> AdapterConfig:
        """This config with the overrides whose pattern matches ``path`` applied."""
        changes: dict[str, Any] = {}
        for pattern, items in self.overrides:
            if re.fullmatch(pattern, path):
                changes.update(items)
        return dataclasses.replace(self, overrides=(), **changes) if changes else self

    def selects(self, path: str) -> bool:
        """Whether ``target_modules`` selects the layer at ``path`` (before ``exclude_modules``)."""
        if self.target_modules == ALL_LINEAR:
            return not (matches_within(path, OUTPUT_HEADS) or self.in_modules_to_save(path))
        return matches(path, self.target_modules)

    def is_target(self, path: str) -> bool:
        """Whether the layer at ``path`` is targeted and not excluded."""
        return self.selects(path) and not matches(path, self.exclude_modules)

    def in_modules_to_save(self, path: str) -> bool:
        """Whether ``path`` (a module or parameter path) lies in a module trained in full."""
        return bool(self.modules_to_save) and matches_within(path, self.modules_to_save)

    @property
    def adapter_method(self) -> AdapterMethod:
        """The method's pure functions (see :class:`~cdvft_jax.methods.AdapterMethod`)."""
        raise NotImplementedError(f"{type(self).__name__} does not define its adapter method")

    @property
    def scaling(self) -> float:
        """The factor applied to the method's delta; ``alpha`` unless a method says otherwise."""
        return self.alpha

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, ``method`` first; inverse of :func:`config_from_dict`."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "overrides":
                value = {pattern: dict(items) for pattern, items in value}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def to_json(self) -> str:
        """The config as a JSON string."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        """Inverse of :meth:`to_json`; a subclass rejects a config of another method."""
        config = config_from_json(text)
        if not isinstance(config, cls):
            raise ValueError(f"expected a {cls.method!r} config, got method {config.method!r}")
        return config


def config_from_dict(data: Mapping[str, Any]) -> AdapterConfig:
    """Rebuilds a config from :meth:`AdapterConfig.to_dict` output.

    Raises:
      ValueError: if ``method`` is missing or unknown, or a key is not a field.
    """
    data = dict(data)
    cls = method_spec(data.pop("method", None)).config_class
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {unknown}; its fields are {sorted(fields)}")
    return cls(**data)


def config_from_json(text: str) -> AdapterConfig:
    """Rebuilds a config from :meth:`AdapterConfig.to_json` output."""
    return config_from_dict(json.loads(text))
