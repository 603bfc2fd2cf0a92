"""The offline API reference at ``/docs``: the OpenAPI document drawn as one self-contained HTML page
(factories are offline: no Swagger UI from a CDN)."""

from __future__ import annotations

import html
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from .security import PAGE_POLICY


def add_docs_page(app: FastAPI) -> None:
    """``/docs``: :func:`docs_html` of the app's OpenAPI document (no token needed)."""

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    def docs() -> HTMLResponse:
        return HTMLResponse(docs_html(app.openapi()), headers={"content-security-policy": PAGE_POLICY})


def docs_html(spec: dict[str, Any]) -> str:
    """The OpenAPI document as one self-contained HTML page: every route, its parameters, bodies and answers."""
    esc = html.escape
    info = spec.get("info", {})
    out = [
        "<!doctype html><html lang=en><meta charset=utf-8><title>defectscope API</title>",
        "<style>body{font:15px/1.45 system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "code{background:#eee;padding:0 .2em}h2{margin-top:2em;border-top:1px solid #ccc;padding-top:.5em}"
        ".m{font-weight:bold;text-transform:uppercase}"
        "td,th{padding:0 1em 0 0;vertical-align:top;text-align:left}</style>",
        f"<h1>{esc(info.get('title', 'API'))} {esc(str(info.get('version', '')))}</h1>",
        f"<p>{esc(info.get('description', ''))}</p>",
        '<p>The machine-readable description: <a href="/openapi.json">/openapi.json</a>.</p>',
    ]
    for path, methods in spec.get("paths", {}).items():
        for method, op in methods.items():
            out.append(f"<h2><span class=m>{esc(method)}</span> <code>{esc(path)}</code></h2>")
            out.append(f"<p>{esc(op.get('summary', ''))}</p>")
            params = op.get("parameters", [])
            if params:
                out.append("<table><tr><th>parameter</th><th>in</th><th>about</th></tr>")
                for param in params:
                    about = param.get("description") or param.get("schema", {}).get("type", "")
                    needed = " (required)" if param.get("required") else ""
                    out.append(
                        f"<tr><td><code>{esc(param.get('name', ''))}</code></td><td>{esc(param.get('in', ''))}</td>"
                        f"<td>{esc(str(about))}{needed}</td></tr>"
                    )
                out.append("</table>")
            body = op.get("requestBody")
            if body:
                kinds = ", ".join(f"<code>{esc(k)}</code>" for k in body.get("content", {}))
                out.append(f"<p>Body: {kinds}. {esc(body.get('description', ''))}</p>")
            answers = ", ".join(
                f"{esc(str(code))} {esc(r.get('description', ''))}" for code, r in op.get("responses", {}).items()
            )
            out.append(f"<p>Answers: {answers}</p>")
    return "\n".join(out) + "\n"
