"""Sphinx directives for the pyro_subnet docs.

* ``.. markdown:: PATH``: a Markdown file (the README, ``docs/*.md``) as part of the page.
* ``.. tutorials:: GLOB``: every tutorial script (Jupytext "percent" format: ``# %% [markdown]``
  cells of ``#``-comments and ``# %%`` code cells) as one section each, the Markdown cells as text
  and the code cells as highlighted Python, with a link to download the script.
* ``.. module-reference:: PACKAGE ...``: autodoc of every plain module under ``PACKAGE`` (packages
  and the modules listed in ``pyro_subnet_public_modules`` are documented on the API pages), each
  without the members that a public package exports, which the API pages document under the name
  users write (``pyro_subnet.nn.BayesianNet``, not ``pyro_subnet.nn.bayesian_net.BayesianNet``).

The Markdown reader knows what these files use: headings, paragraphs, bullet and numbered lists,
fenced code, pipe tables, ``$...$`` and ``$$...$$`` math, inline code, bold, italics and links.
Every other character is escaped, so that text is never read as reST markup: a Markdown file
cannot break the build with a reST warning, and it shows as written.
"""

from __future__ import annotations

import glob
import importlib
import os
import pkgutil
import re
from typing import Iterable, List, Optional

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

# ---------------------------------------------------------------------------------------------
# Markdown -> reST

_TITLE_CHARS = "=-~^\"'"
_INLINE = re.compile(
    r"(?P<code>`(?P<code_text>[^`]+)`)"
    r"|(?P<math>\$(?P<math_text>[^$]+)\$)"
    r"|(?P<link>\[(?P<link_text>[^\]]+)\]\((?P<link_url>[^)\s]+)\))"
    r"|(?P<strong>\*\*(?P<strong_text>[^*]+)\*\*)"
    r"|(?P<em>(?<![\w*])\*(?P<em_text>[^*\s][^*]*)\*(?![\w*]))"
)
_ITEM = re.compile(r"^(\s*)([-*+]|\d+[.)])\s+(.*)$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


def escape(text: str) -> str:
    """Plain text as reST: every character but letters, digits and spaces backslash-escaped."""
    return re.sub(r"([^A-Za-z0-9 ])", r"\\\1", text)


def _markup(start: str, content: str, end: Optional[str] = None) -> str:
    # ``\ `` (an escaped space, which renders as nothing) lets inline markup touch any text.
    return f"\\ {start}{content}{start if end is None else end}\\ "


def inline(text: str) -> str:
    """One line of Markdown text as one line of reST."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(escape(text[pos:m.start()]))
        pos = m.end()
        if m.group("code"):
            content = m.group("code_text").strip()
            out.append(_markup("``", content) if content else "")
        elif m.group("math"):
            out.append(_markup(":math:`", m.group("math_text").strip(), "`"))
        elif m.group("link"):
            label, url = m.group("link_text").replace("`", ""), m.group("link_url")
            if url.startswith("#"):                       # an anchor on the Markdown page: text only
                out.append(escape(label))
            else:
                out.append(_markup("`", f"{escape(label)} <{url}>", "`__"))
        elif m.group("strong"):
            out.append(_markup("**", escape(m.group("strong_text").replace("`", "").strip())))
        else:
            out.append(_markup("*", escape(m.group("em_text").replace("`", "").strip())))
    out.append(escape(text[pos:]))
    line = "".join(out)
    line = line[2:] if line.startswith("\\ ") else line
    line = line[:-2] if line.endswith("\\ ") else line
    return line.strip()


def _title(text: str, depth: int) -> List[str]:
    title = inline(text) or escape("(untitled)")
    return ["", title, _TITLE_CHARS[min(depth, len(_TITLE_CHARS)) - 1] * (len(title) + 2), ""]


def _paragraph(lines: List[str]) -> List[str]:
    """A paragraph, split around ``$$...$$`` display math."""
    out = []
    for i, part in enumerate(re.split(r"\$\$", "\n".join(lines))):
        if i % 2:                                        # display math
            math = [ln.strip() for ln in part.strip().splitlines() if ln.strip()]
            if math:
                out += ["", ".. math::", ""] + ["   " + ln for ln in math] + [""]
        else:
            text = " ".join(ln.strip() for ln in part.splitlines() if ln.strip())
            if text:
                out += ["", inline(text), ""]
    return out


def _table(rows: List[str]) -> List[str]:
    def cells(row):
        row = row.strip()
        row = row[1:] if row.startswith("|") else row
        row = row[:-1] if row.endswith("|") else row
        return [c.strip() for c in row.split("|")]

    header, body = cells(rows[0]), [cells(r) for r in rows[2:]]
    width = len(header)
    out = ["", ".. list-table::", "   :header-rows: 1", ""]
    for row in [header] + body:
        row = (row + [""] * width)[:width]
        out.append("   * - " + inline(row[0]))
        out += ["     - " + inline(c) for c in row[1:]]
    return out + [""]


def markdown_to_rst(text: str, depth: int = 1) -> List[str]:
    """Markdown as reST lines. ``depth``: the section depth of the first heading (headings never
    skip a level, whatever the Markdown does, so that docutils never sees an inconsistent one)."""
    lines = text.splitlines()
    out: List[str] = []
    para: List[str] = []
    items: List[List[str]] = []       # [marker, text lines...]
    current = depth - 1
    i = 0

    def flush():
        nonlocal para, items
        if para:
            out.extend(_paragraph(para))
            para = []
        if items:
            out.append("")
            kind = None
            for marker, *body in items:
                this = "#." if marker[0].isdigit() else "-"
                if kind is not None and this != kind:
                    out.append("")
                kind = this
                item = " ".join(ln.strip() for ln in body if ln.strip()).replace("$$", "$")
                out.append(f"{this} {inline(item) or escape('-')}")
            out.append("")
            items = []

    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            flush()
            mark, lang = fence.group(1), fence.group(2) or "text"
            code = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(mark):
                code.append(lines[i])
                i += 1
            i += 1
            while code and not code[-1].strip():
                code.pop()
            if any(c.strip() for c in code):
                out += ["", f".. code-block:: {lang}", ""] + ["   " + c if c.strip() else "" for c in code] + [""]
            continue
        heading = _HEADING.match(line)
        if heading:
            flush()
            current = min(len(heading.group(1)) + depth - 1, current + 1)
            out += _title(heading.group(2), current)
            i += 1
            continue
        if line.strip().startswith("|") and i + 1 < len(lines) and _TABLE_RULE.match(lines[i + 1]):
            flush()
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(lines[i])
                i += 1
            out += _table(rows)
            continue
        if not line.strip() or re.match(r"^\s*([-*_]\s*){3,}$", line):
            flush()
            i += 1
            continue
        item = _ITEM.match(line)
        if item and not para:
            items.append([item.group(2), item.group(3)])
        elif items:
            items[-1].append(line)                       # an item's continuation line
        else:
            para.append(re.sub(r"^\s*>\s?", "", line))
        i += 1
    flush()
    return out


def percent_script_to_rst(source: str, title: str, download: str) -> List[str]:
    """A Jupytext percent-format script as reST: its first heading (or ``title``) as the section
    title, then a link to the script, the Markdown cells as text and the code cells as Python."""
    cells, kind, body = [], None, []
    for line in source.splitlines():
        if line.startswith("# %%"):
            if kind is not None:
                cells.append((kind, body))
            kind, body = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            body.append(line)
    if kind is not None:
        cells.append((kind, body))

    out: List[str] = []
    link = ["", f"The script: :download:`{escape(os.path.basename(download))} <{download}>`.", ""]
    has_title = False
    for kind, body in cells:
        if kind == "markdown":
            md = [re.sub(r"^# ?", "", ln) if ln.startswith("#") else ln for ln in body]
            if not has_title:
                has_title = True
                first = next((ln for ln in md if ln.strip()), "")
                if _HEADING.match(first):
                    md.remove(first)
                    out += _title(_HEADING.match(first).group(2), 1)
                else:
                    out += _title(title, 1)
                out += link
            out += markdown_to_rst("\n".join(md), depth=2)
        else:
            while body and not body[0].strip():
                body.pop(0)
            while body and not body[-1].strip():
                body.pop()
            if not body:
                continue
            if not has_title:
                has_title = True
                out += _title(title, 1) + link
            out += ["", ".. code-block:: python", ""] + ["   " + ln if ln.strip() else "" for ln in body] + [""]
    return out


# ---------------------------------------------------------------------------------------------
# Directives

class _Generated(SphinxDirective):
    def parse(self, lines: Iterable[str], source: str) -> List[nodes.Node]:
        node = nodes.section()
        node.document = self.state.document
        content = StringList()
        for n, line in enumerate(lines):
            content.append(line, source, n)
        nested_parse_with_titles(self.state, content, node)
        return node.children

    def path(self, name: str) -> str:
        """A path relative to the page (or, with a leading ``/``, to the docs folder)."""
        return self.env.relfn2path(name, self.env.docname)[1]


class MarkdownDirective(_Generated):
    """``.. markdown:: PATH``: a Markdown file; ``:start-after: TEXT`` keeps what follows the
    first line that contains ``TEXT``."""

    required_arguments = 1
    option_spec = {"start-after": directives.unchanged}

    def run(self):
        path = self.path(self.arguments[0])
        self.env.note_dependency(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if "start-after" in self.options:
            lines = text.splitlines()
            start = next((n for n, ln in enumerate(lines) if self.options["start-after"] in ln), None)
            if start is None:
                raise self.error(f"{self.arguments[0]} has no line with {self.options['start-after']!r}")
            text = "\n".join(lines[start + 1:])
        return self.parse(markdown_to_rst(text), path)


class TutorialsDirective(_Generated):
    """``.. tutorials:: GLOB``: every matching tutorial script, in file-name order."""

    required_arguments = 1

    def run(self):
        pattern = self.path(self.arguments[0])
        paths = sorted(glob.glob(pattern))
        if not paths:
            raise self.error(f"no tutorial matches {self.arguments[0]!r}")
        here = os.path.dirname(self.env.doc2path(self.env.docname))
        result: List[nodes.Node] = []
        for path in paths:
            self.env.note_dependency(path)
            with open(path, encoding="utf-8") as f:
                source = f.read()
            name = os.path.splitext(os.path.basename(path))[0]
            download = os.path.relpath(path, here).replace(os.sep, "/")
            result += self.parse(percent_script_to_rst(source, name.replace("_", " "), download), path)
        return result


def _public_objects(config) -> set:
    """ids of the objects that the public packages export (documented on the API pages)."""
    ids = set()
    for name in config.pyro_subnet_public_modules:
        module = importlib.import_module(name)
        ids |= {id(getattr(module, attr)) for attr in getattr(module, "__all__", ())
                if not isinstance(getattr(module, attr), type(module))}
    return ids


class ModuleReferenceDirective(_Generated):
    """``.. module-reference:: PACKAGE [PACKAGE ...]``: every plain module under each ``PACKAGE``,
    one section each; with ``:top-level:``, only the modules directly in it."""

    required_arguments = 1
    optional_arguments = 20
    option_spec = {"top-level": directives.flag}

    def run(self):
        public = set(self.config.pyro_subnet_public_modules)
        exported = _public_objects(self.config)
        lines: List[str] = []
        for package in map(importlib.import_module, self.arguments):
            walk = pkgutil.iter_modules if "top-level" in self.options else pkgutil.walk_packages
            for info in sorted(walk(package.__path__, package.__name__ + "."), key=lambda m: m.name):
                if not info.ispkg and info.name not in public:
                    lines += self.module(info.name, public, exported)
        return self.parse(lines, " ".join(self.arguments))

    def module(self, name: str, public: set, exported: set) -> List[str]:
        module = importlib.import_module(name)
        self.env.note_dependency(module.__file__)
        # Documented on the API pages: whatever a public module exports (also where this module
        # imports it and lists it in its own ``__all__``).
        skip = sorted(k for k, v in vars(module).items() if id(v) in exported)
        lines = ["", f"``{name}``", "-" * (len(name) + 6), "", f".. automodule:: {name}", "   :members:"]
        if skip:
            lines.append("   :exclude-members: " + ", ".join(skip))
        parent, _, leaf = name.rpartition(".")
        if parent in public and leaf in getattr(importlib.import_module(parent), "__all__", ()):
            # e.g. the module ``diagnostics.pointwise`` beside the function ``diagnostics.pointwise``
            # that the API pages document: one target per name.
            lines.append("   :no-index:")
        return lines + [""]


def setup(app):
    app.add_config_value("pyro_subnet_public_modules", [], "env")
    app.add_directive("markdown", MarkdownDirective)
    app.add_directive("tutorials", TutorialsDirective)
    app.add_directive("module-reference", ModuleReferenceDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
