"""Render a document of simple blocks as Markdown, HTML or PDF.

A document is a list of `Block`s (headings, paragraphs, bullet lists, tables, preformatted
text): enough for a reviewer's document, and small enough that each format is a short
function. PDF pages are drawn with matplotlib's PDF backend (already a dependency, with
fonts that cover any text), laid out line by line on A4 pages.
"""

from __future__ import annotations

import html
import io
import textwrap
from dataclasses import dataclass, field

KINDS = ("h1", "h2", "p", "ul", "table", "code")


@dataclass
class Block:
    """One piece of a document: `kind` is one of KINDS; `text` for headings, paragraphs and
    code; `items` for a bullet list; `rows` for a table (the first row is its header)."""

    kind: str
    text: str = ""
    items: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block]) -> str:
    """The document as Markdown."""
    out: list[str] = []
    for block in blocks:
        if block.kind == "h1":
            out += [f"# {block.text}", ""]
        elif block.kind == "h2":
            out += [f"## {block.text}", ""]
        elif block.kind == "p":
            out += [block.text, ""]
        elif block.kind == "ul":
            out += [*(f"- {item}" for item in block.items), ""]
        elif block.kind == "table":
            header, *rows = block.rows
            out.append("| " + " | ".join(map(_md_cell, header)) + " |")
            out.append("|" + " --- |" * len(header))
            out += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
            out.append("")
        else:
            out += ["```", block.text, "```", ""]
    return "\n".join(out)


_STYLE = (
    "body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
    "table{border-collapse:collapse}td,th{border:1px solid #999;padding:.2em .5em;"
    "text-align:left}pre{background:#f4f4f4;padding:.5em;overflow-x:auto}"
)


def to_html(blocks: list[Block]) -> str:
    """The document as one self-contained HTML page (every text escaped)."""
    esc = html.escape
    title = next((b.text for b in blocks if b.kind == "h1"), "document")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
    ]
    for block in blocks:
        if block.kind in ("h1", "h2", "p"):
            out.append(f"<{block.kind}>{esc(block.text)}</{block.kind}>")
        elif block.kind == "ul":
            out.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in block.items) + "</ul>")
        elif block.kind == "table":
            header, *rows = block.rows
            out.append("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows]
            out.append("</table>")
        else:
            out.append(f"<pre>{esc(block.text)}</pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class LineStyle:
    """How one kind of line is drawn in the PDF: font size (pt), family, weight, wrap width
    in characters."""

    size: float
    family: str = "sans-serif"
    weight: str = "normal"
    width: int = 100


PDF_STYLES = {
    "h1": LineStyle(15, weight="bold", width=60),
    "h2": LineStyle(11.5, weight="bold", width=80),
    "p": LineStyle(9, width=98),
    "code": LineStyle(7, family="monospace", width=112),
}


def _table_lines(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return [lines[0], "-" * len(lines[0]), *lines[1:]]


def pdf_lines(blocks: list[Block]) -> list[tuple[str, str]]:
    """The document as (style, line) pairs, wrapped to each style's width."""
    out: list[tuple[str, str]] = []

    def add(style: str, text: str, indent: str = "") -> None:
        width = PDF_STYLES[style].width
        for raw in text.splitlines() or [""]:
            pieces = textwrap.wrap(raw, width, subsequent_indent=indent) if raw else [""]
            out.extend((style, piece) for piece in pieces)

    for block in blocks:
        if block.kind in ("h1", "h2", "p"):
            add(block.kind, block.text)
        elif block.kind == "ul":
            for item in block.items:
                add("p", f"• {item}", indent="   ")
        elif block.kind == "table":
            add("code", "\n".join(_table_lines(block.rows)))
        else:
            add("code", block.text)
        out.append(("p", ""))
    return out


def to_pdf(blocks: list[Block]) -> bytes:
    """The document as an A4 PDF, drawn with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    page_w, page_h, margin = 8.27, 11.69, 0.7  # inches
    buffer = io.BytesIO()
    with PdfPages(buffer, metadata={"Creator": "tilpass card"}) as pdf:
        figure, y = None, 0.0
        for style_name, line in pdf_lines(blocks):
            style = PDF_STYLES[style_name]
            step = style.size * 1.45 / 72
            if figure is None or y - step < margin:
                if figure is not None:
                    pdf.savefig(figure)
                    plt.close(figure)
                figure, y = plt.figure(figsize=(page_w, page_h)), page_h - margin
            y -= step
            figure.text(
                margin / page_w,
                y / page_h,
                line,
                fontsize=style.size,
                family=style.family,
                weight=style.weight,
                va="baseline",
            )
        if figure is not None:
            pdf.savefig(figure)
            plt.close(figure)
    return buffer.getvalue()


def render(blocks: list[Block], fmt: str) -> bytes:
    """The document in format `fmt`: "md", "html" or "pdf"."""
    if fmt == "md":
        return to_markdown(blocks).encode()
    if fmt == "html":
        return to_html(blocks).encode()
    if fmt == "pdf":
        return to_pdf(blocks)
    raise ValueError(f"unknown document format {fmt!r}; choose md, html or pdf")
