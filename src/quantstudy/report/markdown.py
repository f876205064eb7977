"""Document -> Markdown (GitHub-flavoured tables; plots as PNG files beside report.md)."""

from __future__ import annotations

from quantstudy.report.document import Bullets, Code, Document, Heading, Image, Para, Table, cell


def plot_file(key: str) -> str:
    return f"report-{key}.png"


def render(doc: Document, plots: set[str]) -> str:
    """`plots`: the plot keys that exist; an Image whose plot was not made is left out."""
    out = [f"# {doc.title}", ""]
    for b in doc.blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):
            out.append("| " + " | ".join(cell(h) for h in b.header) + " |")
            out.append("|" + "|".join("---" for _ in b.header) + "|")
            out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in b.rows]
            out += [""] + ([f"*{b.note}*", ""] if b.note else [])
        elif isinstance(b, Image):
            if b.plot in plots:
                out += [f"![{b.alt}]({plot_file(b.plot)})", ""]
        elif isinstance(b, Code):
            out += ["```", b.text, "```", ""]
    return "\n".join(out).rstrip() + "\n"
