"""What a request's output must match: vLLM's ``StructuredOutputsParams`` (exactly one kind per request).

``json`` is a JSON schema (dict or its text), ``json_object`` any JSON object, ``regex`` a regular
expression, ``choice`` one of a list of strings, ``grammar`` an EBNF grammar (GBNF style, ``root ::= ...``)
or a Lark grammar. The server maps OpenAI's ``response_format`` and vLLM's ``structured_outputs`` request
field onto this; the engine compiles it (``grammar.py``) and rejects what does not compile with an
``InvalidGrammarError`` that names the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kubeinfer.engine.errors import InvalidRequestError


class InvalidGrammarError(InvalidRequestError):
    """A schema, regex, choice list or grammar that cannot be compiled (the request's fault: HTTP 400)."""

    def __init__(self, message: str, param: str = "structured_outputs") -> None:
        super().__init__(message, param, code="invalid_grammar")


_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # JSON schemas: ``True`` (OpenAI's ``strict``, xgrammar's strict mode) allows no property or item the schema
    # does not declare; ``False`` follows JSON Schema's defaults (undeclared properties allowed unless
    # ``additionalProperties: false``). Either way the output matches the schema.
    strict: bool = True
    # Where the constraint came from, for error messages (``response_format`` or ``structured_outputs``).
    source: str = "structured_outputs"

    def __post_init__(self) -> None:
        chosen = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(chosen) != 1:
            what = "none" if not chosen else ", ".join(chosen)
            raise InvalidGrammarError(
                f"structured outputs need exactly one of {', '.join(_KINDS)}; got {what}", self.source)
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidGrammarError("choice must be a non-empty list of non-empty strings", self.source)
        if isinstance(self.json, str):
            try:
                value = json.loads(self.json)
            except ValueError as exc:
                raise InvalidGrammarError(f"the JSON schema is not valid JSON: {exc}", self.source) from exc
            if not isinstance(value, dict | bool):
                raise InvalidGrammarError("the JSON schema must be a JSON object", self.source)
        elif self.json is not None and not isinstance(self.json, dict | bool):
            raise InvalidGrammarError("the JSON schema must be a JSON object", self.source)

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def cache_key(self) -> tuple[str, str, bool]:
        """What the compiled grammar depends on (``source`` does not change it)."""
        kind = self.kind
        value = getattr(self, kind)
        if kind == "json":
            # Key order stays: it is the order in which the properties are generated.
            return kind, json.dumps(json.loads(value) if isinstance(value, str) else value), self.strict
        if kind == "choice":
            return kind, json.dumps(value), False
        return kind, "" if kind == "json_object" else value, False
