"""A self-contained API docs page rendered from the OpenAPI document (works with no internet access)."""

from __future__ import annotations

import html
import json
from typing import Any


def docs_page(spec: dict[str, Any]) -> str:
    rows = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            rows.append(
                f"<h3><code>{method.upper()} {html.escape(path)}</code></h3>"
                f"<p>{html.escape(operation.get('summary', ''))}</p>"
                f"<p>{html.escape(operation.get('description', ''))}</p>"
            )
    schemas = "".join(
        f"<h3 id='{html.escape(name)}'>{html.escape(name)}</h3><pre>{html.escape(json.dumps(schema, indent=2))}</pre>"
        for name, schema in spec["components"]["schemas"].items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Chara Forge API</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
        "pre{background:#f4f4f4;padding:1rem;overflow:auto}</style></head><body>"
        f"<h1>{html.escape(spec['info']['title'])} {html.escape(spec['info']['version'])}</h1>"
        "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a></p>"
        f"<h2>Endpoints</h2>{''.join(rows)}<h2>Schemas</h2>{schemas}</body></html>"
    )
