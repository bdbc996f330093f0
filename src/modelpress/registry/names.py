"""Model names, stages and references (``NAME``, ``NAME:VERSION``, ``NAME:latest``, ``NAME@stage``).

A name is what a user types, and it ends up in file and URL paths elsewhere (serving routes,
exported folders), so it is held to a small alphabet: letters, digits, ``-``, ``_`` and ``.``,
1 to 128 characters, not starting with ``.`` and never containing ``..``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from modelpress.errors import ConfigError, InvalidNameError, InvalidReferenceError, InvalidStageError

MAX_NAME = 128
MAX_TAG = 128
MAX_VERSION = 2**31 - 1  # versions are 32-bit INTEGER columns on every database
STAGES = ("candidate", "staging", "production", "archived")
NAME_EXAMPLE = "minilm-sts.int8"
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_VERSION_RE = re.compile(r"[vV]?([0-9]+)")  # ASCII digits only: str.isdigit() also accepts '²' and '١'
_REF_HELP = "Use NAME (the latest version), NAME:VERSION (e.g. minilm:3), NAME:latest or NAME@production."


def validate_name(name: object) -> str:
    """Return ``name`` when it is a valid model name, else raise :class:`InvalidNameError`."""
    hint = f"Use 1 to {MAX_NAME} letters, digits, '-', '_' or '.', e.g. '{NAME_EXAMPLE}'."
    if not isinstance(name, str):
        raise InvalidNameError(f"A model name must be a string, not {type(name).__name__}.", hint=hint)
    shown = name if len(name) <= 40 else name[:37] + "..."
    if not name:
        raise InvalidNameError("The model name is empty.", hint=hint)
    if len(name) > MAX_NAME:
        raise InvalidNameError(f"The model name '{shown}' has {len(name)} characters; at most {MAX_NAME} are allowed.", hint=hint)
    if "/" in name or "\\" in name:
        raise InvalidNameError(f"The model name '{shown}' contains a path separator.", hint=hint)
    if ".." in name:
        raise InvalidNameError(f"The model name '{shown}' contains '..'.", hint=hint)
    if name.startswith("."):
        raise InvalidNameError(f"The model name '{shown}' starts with '.'.", hint=hint)
    if not _NAME_RE.fullmatch(name):
        bad = sorted({c for c in name if not _NAME_RE.fullmatch(c)})
        raise InvalidNameError(f"The model name '{shown}' contains {', '.join(repr(c) for c in bad)}.", hint=hint)
    return name


def validate_tag(tag: object) -> str:
    """Return ``tag`` without surrounding spaces when it is 1 to 128 printable characters."""
    if not (isinstance(tag, str) and 0 < len(tag.strip()) <= MAX_TAG and tag.isprintable()):
        raise ConfigError(f"{tag!r} is not a valid tag.", hint=f"A tag is 1 to {MAX_TAG} printable characters, e.g. 'fp16' or 'best-sts'.")
    return tag.strip()


def validate_stage(stage: object) -> str:
    if not isinstance(stage, str) or stage.lower() not in STAGES:
        raise InvalidStageError(f"'{stage}' is not a stage.", hint=f"Use one of {', '.join(STAGES)}, e.g. --stage production.")
    return stage.lower()


@dataclass(frozen=True)
class Ref:
    """A parsed reference: exactly one of ``version`` and ``stage`` is set, or neither (the latest)."""

    name: str
    version: int | None = None
    stage: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        if self.stage is not None:
            return f"{self.name}@{self.stage}"
        return f"{self.name}:latest"


def parse_ref(text: object) -> Ref:
    """Parse ``NAME``, ``NAME:VERSION``, ``NAME:latest`` or ``NAME@stage``."""
    if isinstance(text, Ref):
        return text
    if not isinstance(text, str) or not text.strip():
        raise InvalidReferenceError(f"{text!r} is not a model reference.", hint=_REF_HELP)
    text = text.strip()
    if "@" in text and ":" in text:
        raise InvalidReferenceError(f"'{text}' has both a version and a stage.", hint=_REF_HELP)
    if "@" in text:
        name, _, stage = text.partition("@")
        if stage.lower() not in STAGES:
            raise InvalidReferenceError(
                f"'{text}' names the stage '{stage}', which does not exist.", hint=f"Stages: {', '.join(STAGES)}. {_REF_HELP}"
            )
        return Ref(_ref_name(name, text), stage=stage.lower())
    if ":" in text:
        name, _, version = text.partition(":")
        name = _ref_name(name, text)
        if version.lower() == "latest":
            return Ref(name)
        match = _VERSION_RE.fullmatch(version)
        number = int(match.group(1)) if match and len(match.group(1)) <= 10 else 0
        if not 1 <= number <= MAX_VERSION:
            raise InvalidReferenceError(
                f"'{text}' has the version '{version}'; a version is a whole number from 1 to {MAX_VERSION}.", hint=_REF_HELP
            )
        return Ref(name, version=number)
    return Ref(_ref_name(text, text))


def _ref_name(name: str, text: str) -> str:
    try:
        return validate_name(name)
    except InvalidNameError as exc:
        raise InvalidReferenceError(f"'{text}' is not a valid reference: {exc.message}", hint=f"{exc.hint} {_REF_HELP}") from None
