"""OpenAI's ``response_format`` and vLLM's ``structured_outputs`` request fields -> ``StructuredOutputsParams``.

Checked here only for their shape (one kind, a schema present); whether the schema, regex or grammar
compiles is the engine's call (``InvalidGrammarError`` -> 400 with the reason).
"""

from __future__ import annotations

from kubeinfer.engine.server.errors import OpenAIError, unsupported
from kubeinfer.engine.server.protocol import SamplingFields
from kubeinfer.engine.structured_outputs import InvalidGrammarError, StructuredOutputsParams


def structured_outputs_of(request: SamplingFields) -> StructuredOutputsParams | None:
    fmt, so = request.response_format, request.structured_outputs
    wants_format = fmt is not None and fmt.type != "text"
    if wants_format and so is not None:
        raise unsupported("response_format and structured_outputs cannot both be set", "structured_outputs")
    try:
        if so is not None:
            return StructuredOutputsParams(json=so.json_, regex=so.regex, choice=so.choice, grammar=so.grammar,
                                           json_object=so.json_object, source="structured_outputs")
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return StructuredOutputsParams(json_object=True, source="response_format")
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise unsupported("response_format of type json_schema needs json_schema.schema", "response_format")
        return StructuredOutputsParams(json=fmt.json_schema.schema_, strict=fmt.json_schema.strict is True,
                                       source="response_format")
    except InvalidGrammarError as exc:
        raise OpenAIError(400, str(exc), param=exc.param, code=exc.code) from exc
