"""The HTTP door's OpenAPI 3.1 document, and the per-action request schemas that
BioLM's SDK fetches (`GET /api/v3/schema/esm2-8m/{action}/`, for `maxItems`).

Built from the same limits the validation applies; a test checks served responses
against these schemas."""

from __future__ import annotations

from esm2_service.server.http_requests import ACTIONS, INCLUDE_NAMES
from esm2_service.server.http_results import AMINO_ACID_TOKENS
from esm2_service.validation import MAX_ITEMS, MAX_TOKENS, NUM_LAYERS

MODEL = "esm2-8m"
API_PREFIX = f"/api/v3/{MODEL}"

_FLOATS = {"type": "array", "items": {"type": ["number", "null"]}}  # null: a NaN
_MATRIX = {"type": "array", "items": _FLOATS}
_LAYER = {"type": "integer", "minimum": 0, "maximum": NUM_LAYERS}


def _items(allow_mask: bool) -> dict:
    alphabet = "20 standard amino acids, X B U Z O and '-', in either case" + (
        ", and <mask> (one token; at least one per sequence)" if allow_mask else ""
    )
    sequence = {
        "type": "string",
        "minLength": 1,
        "description": f"1 to {MAX_TOKENS:,} tokens: {alphabet}",
    }
    if not allow_mask:
        sequence["maxLength"] = MAX_TOKENS
    return {
        "type": "array",
        "minItems": 1,
        "maxItems": MAX_ITEMS,
        "items": {
            "type": "object",
            "additionalProperties": False,
            "required": ["sequence"],
            "properties": {"sequence": sequence},
        },
    }


def _request(action: str) -> dict:
    properties = {"items": _items(allow_mask=action == "predict")}
    if action == "encode":
        properties["params"] = {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "repr_layers": {
                    "type": "array",
                    "items": {
                        "type": "integer",
                        "minimum": -(NUM_LAYERS + 1),
                        "maximum": NUM_LAYERS,
                    },
                    "default": [-1],
                    "description": "0 is the embedding output, 6 the last layer; -1 is 6",
                },
                "include": {
                    "type": "array",
                    "items": {"enum": list(INCLUDE_NAMES)},
                    "default": ["mean"],
                },
            },
        }
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["items"],
        "properties": properties,
        "title": f"ESM2{action.title().replace('_', '')}Request",
    }


def request_schema(action: str) -> dict:
    """The JSON schema of `action`'s request body, as BioLM serves it to its SDK."""
    return _request(action)


def _layered(field: str, value: dict) -> dict:
    entry = {
        "type": "object",
        "required": ["layer", field],
        "properties": {"layer": _LAYER, field: value},
    }
    return {"type": "array", "items": entry}


_VOCAB = {"type": "array", "items": {"enum": AMINO_ACID_TOKENS}, "minItems": 20, "maxItems": 20}

_RESPONSES = {
    "encode": {
        "type": "object",
        "required": ["results"],
        "properties": {
            "results": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["sequence_index"],
                    "properties": {
                        "sequence_index": {"type": "integer", "minimum": 0},
                        "embeddings": _layered("embedding", _FLOATS),
                        "bos_embeddings": _layered("embedding", _FLOATS),
                        "per_token_embeddings": _layered("embeddings", _MATRIX),
                        "contacts": _MATRIX,
                        "attentions": {
                            "type": "array",
                            "items": _MATRIX,
                            "description": "[20, L, L]",
                        },
                        "logits": {
                            **_MATRIX,
                            "description": "[L, 20]: columns in vocab_tokens order",
                        },
                        "vocab_tokens": _VOCAB,
                    },
                },
            }
        },
    },
    "predict": {
        "type": "object",
        "required": ["results"],
        "properties": {
            "results": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["logits", "sequence_tokens", "vocab_tokens"],
                    "properties": {
                        "logits": {**_MATRIX, "description": "[n_masked, 20], one row per <mask>"},
                        "sequence_tokens": {"type": "array", "items": {"type": "string"}},
                        "vocab_tokens": _VOCAB,
                    },
                },
            }
        },
    },
    "log_prob": {
        "type": "object",
        "required": ["results"],
        "properties": {
            "results": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["log_prob"],
                    "properties": {"log_prob": {"type": "number"}},
                },
            }
        },
    },
}

ERROR_SCHEMA = {
    "type": "object",
    "required": ["detail", "code", "status_code", "request_id"],
    "properties": {
        "detail": {"type": "string"},
        "code": {
            "type": "string",
            "description": "the gRPC status code name, e.g. INVALID_ARGUMENT",
        },
        "status_code": {"type": "integer"},
        "request_id": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "msg"],
                "properties": {"field": {"type": "string"}, "msg": {"type": "string"}},
            },
        },
    },
}

_SUMMARIES = {
    "encode": "Embeddings (mean, per-token, BOS), contacts, logits and attentions",
    "predict": "Logits at the <mask> positions",
    "log_prob": "Log-probability of each sequence (one unmasked pass)",
}
_ERRORS = {
    "400": "invalid input: every violation in `errors`",
    "401": "missing or unknown token",
    "413": "request body or response over the limits",
    "429": "queue full: retry after Retry-After seconds",
    "503": "Redis or every worker is unavailable",
    "504": "the deadline passed",
}


def _action_path(action: str) -> dict:
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return {
        "post": {
            "summary": _SUMMARIES[action],
            "operationId": action,
            "security": [{"token": []}, {}],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{action}_request"}
                    }
                },
            },
            "responses": {
                "200": {
                    "description": "one result per item, in request order",
                    "content": {
                        "application/json": {
                            "schema": {"$ref": f"#/components/schemas/{action}_response"}
                        }
                    },
                },
                **{code: {"description": text, **error} for code, text in _ERRORS.items()},
            },
        }
    }


def openapi_document() -> dict:
    schemas = {f"{action}_request": _request(action) for action in ACTIONS}
    schemas |= {f"{action}_response": _RESPONSES[action] for action in ACTIONS}
    schemas["Error"] = ERROR_SCHEMA
    plain = {"200": {"description": "ok"}, "503": {"description": "not ready"}}
    paths = {f"{API_PREFIX}/{action}/": _action_path(action) for action in ACTIONS}
    paths |= {
        "/api/v3/schema/esm2-8m/{action}/": {
            "get": {
                "summary": "The JSON schema of an action's request body (BioLM's SDK reads it)",
                "parameters": [
                    {
                        "name": "action",
                        "in": "path",
                        "required": True,
                        "schema": {"enum": list(ACTIONS)},
                    }
                ],
                "responses": {"200": {"description": "a JSON schema"}},
            }
        },
        "/healthz": {"get": {"summary": "The HTTP process is up", "responses": plain}},
        "/readyz": {"get": {"summary": "Redis answers and a worker is alive", "responses": plain}},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ESM-2 8M (BioLM esm2-8m compatible)",
            "version": "v3",
            "description": "BioLM's esm2-8m JSON API, served by the same queue and workers as "
            "the gRPC API. Logits have 20 columns, the standard amino acids of vocab_tokens.",
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "token": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "Token <token>",
                }
            },
        },
        "paths": paths,
    }


DOCS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>ESM-2 8M HTTP API</title></head>
<body style="font-family: sans-serif; max-width: 50em; margin: 2em auto">
<h1>ESM-2 8M: BioLM-compatible HTTP API</h1>
<p>The OpenAPI 3.1 description is at <a href="/openapi.json">/openapi.json</a>
(load it into any OpenAPI viewer).</p>
<ul>
<li><code>POST /api/v3/esm2-8m/encode/</code>: embeddings, contacts, logits, attentions</li>
<li><code>POST /api/v3/esm2-8m/predict/</code>: logits at <code>&lt;mask&gt;</code> positions</li>
<li><code>POST /api/v3/esm2-8m/log_prob/</code>: each sequence's log-probability</li>
<li><code>GET /healthz</code>, <code>GET /readyz</code></li>
</ul>
<p>Requests and responses follow BioLM's esm2-8m JSON API; send
<code>Authorization: Token &lt;token&gt;</code> when the service requires tokens.</p>
</body></html>
"""
