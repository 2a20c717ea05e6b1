"""`GET /docs`: the API reference as one self-contained page, drawn from the OpenAPI schema.

FastAPI's own `/docs` (Swagger UI) and `/redoc` load their JavaScript and CSS from a CDN,
so opening them sends every reader's browser to a third party, and they do not work
offline. This page is plain HTML written on the server: each endpoint with its request
fields (type, default, description) and its answer, no script at all, and a
Content-Security-Policy that lets it load nothing. The machine-readable schema is at
`/openapi.json`.
"""

from __future__ import annotations

import html
import json
from typing import Any

from fastapi.responses import HTMLResponse

CSP = ("default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")

_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }
h2 { margin-top: 2.5rem; border-bottom: 1px solid #ddd; } code { background: #f3f3f3; padding: 0 .25em; }
.method { font-weight: bold; color: #fff; background: #555; padding: .1em .4em; border-radius: 3px; }
table { border-collapse: collapse; width: 100%; } td, th { text-align: left; vertical-align: top;
  padding: .25em .5em; border-bottom: 1px solid #eee; } .muted { color: #666; }
"""


def docs_response(schema: dict[str, Any]) -> HTMLResponse:
    return HTMLResponse(render(schema), headers={"Content-Security-Policy": CSP})


def render(schema: dict[str, Any]) -> str:
    """The page for an OpenAPI schema (FastAPI's `app.openapi()`)."""
    info = schema.get("info", {})
    components = schema.get("components", {}).get("schemas", {})
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_e(info.get('title', 'API'))} API</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(info.get('title', 'API'))} API</h1><p>{_e(info.get('description', ''))}</p>",
        "<p>The schema, for clients and code generators: "
        "<a href='/openapi.json'><code>/openapi.json</code></a>. Routes marked 🔒 need "
        "<code>Authorization: Bearer KEY</code> when the server has an API key.</p>",
    ]
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            parts.append(_operation(method, path, op, components))
    parts.append("</body></html>")
    return "".join(parts)


def _operation(method: str, path: str, op: dict[str, Any], components: dict[str, Any]) -> str:
    lock = " 🔒" if op.get("security") else ""
    out = [f"<h2><span class='method'>{_e(method.upper())}</span> <code>{_e(path)}</code>{lock}</h2>",
           f"<p>{_e(op.get('summary', ''))}</p>"]
    body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if body is not None:
        model = _resolve(body, components)
        out.append(f"<p>Request body (<code>application/json</code>): <code>{_e(_type(body))}</code></p>")
        out.append(_fields(model, components))
    ok = op.get("responses", {}).get("200", {})
    answer = ", ".join(f"<code>{_e(kind)}</code>" + (f" {_e(_type(c['schema']))}" if "schema" in c else "")
                       for kind, c in ok.get("content", {}).items())
    if answer:
        out.append(f"<p>Answer: {answer}</p>")
    return "".join(out)


def _fields(model: dict[str, Any], components: dict[str, Any]) -> str:
    properties = model.get("properties", {})
    if not properties:
        return ""
    required = set(model.get("required", []))
    rows = []
    for name, prop in properties.items():
        default = "" if "default" not in prop else f"default {json.dumps(prop['default'])}"
        need = "required" if name in required else default
        rows.append(f"<tr><td><code>{_e(name)}</code></td><td>{_e(_type(prop))}</td>"
                    f"<td class='muted'>{_e(need)}</td><td>{_e(prop.get('description', ''))}</td></tr>")
    return "<table><tr><th>field</th><th>type</th><th></th><th></th></tr>" + "".join(rows) + "</table>"


def _resolve(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref", "")
    return components.get(ref.rsplit("/", 1)[-1], {}) if ref else schema


def _type(schema: dict[str, Any]) -> str:
    """A short type name: `integer`, `string | null`, `array of ChatMessage`, `ChatMessage`."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " | ".join(dict.fromkeys(_type(s) for s in schema[key]))
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if "enum" in schema or "const" in schema:
        return " | ".join(json.dumps(v) for v in schema.get("enum", [schema.get("const")]))
    return str(kind)


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)
