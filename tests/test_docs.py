"""The docs build, warnings as errors, and cover the public interface.

``sphinx-build -W --keep-going -b html docs <tmp>`` runs once for the module (in a subprocess, so
that autodoc's imports and Sphinx's logging stay out of the test process); the tests then read the
HTML it wrote: every name that a public module exports has its entry, every module of the package
its section, every tutorial its page section. Two docstring mistakes that the build renders
without a warning are checked on the source: a backslash that Python reads as an escape in a
non-raw docstring (``\\theta`` written as ``\theta`` is a tab and ``heta``), and a field that
names several parameters at once (``:param a, b:`` renders as a parameter ``b`` of type ``a,``).
"""

import ast
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import pyro_subnet

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGE = Path(pyro_subnet.__file__).resolve().parent


def _conf_value(name):
    """A value of ``docs/conf.py``, read without running it."""
    for node in ast.parse((DOCS / "conf.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(name)


PUBLIC = _conf_value("pyro_subnet_public_modules")


@pytest.fixture(scope="module")
def html(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                           "-d", str(out / "doctrees"), str(DOCS), str(out / "html")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the docs build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    pages = {p.relative_to(out / "html").as_posix(): p.read_text(encoding="utf-8")
             for p in (out / "html").rglob("*.html")}
    ids = set()
    for text in pages.values():
        ids |= set(re.findall(r'id="([\w.-]+)"', text))
    return pages, ids


def _modules():
    return ["pyro_subnet"] + sorted(m.name for m in pkgutil.walk_packages(pyro_subnet.__path__, "pyro_subnet."))


def test_docs_build_without_warnings(html):
    pages, _ = html
    for page in ["index.html", "tutorials.html", "readme.html", "api/infer.html", "api/modules.html"]:
        assert page in pages


def test_every_public_name_has_an_entry(html):
    _, ids = html
    exported = {}                     # id(obj) -> every public name of it
    for module_name in PUBLIC:
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None)
        if names is None:                 # a module without __all__: what it defines
            names = [k for k, v in vars(module).items()
                     if not k.startswith("_") and getattr(v, "__module__", None) == module_name]
        for name in names:
            obj = getattr(module, name)
            if not isinstance(obj, type(module)):
                exported.setdefault(id(obj), set()).add(f"{module_name}.{name}")
    missing = sorted(min(names) for names in exported.values() if not names & ids)
    assert not missing, f"public names without an entry in the docs: {missing}"
    for obj in (pyro_subnet.nn.BayesianNet, pyro_subnet.infer.AutoSubnetLaplace, pyro_subnet.infer.SGHMC,
                pyro_subnet.infer.AnnealedSMC, pyro_subnet.infer.AnalyticPredictive, pyro_subnet.to_inference_data):
        assert exported[id(obj)] & ids, obj


def test_every_module_has_a_section(html):
    _, ids = html
    missing = []
    for name in _modules():
        # a module that shares its name with a documented object (diagnostics.pointwise) is not
        # indexed: the object's entry stands for the name
        if f"module-{name}" not in ids and name not in ids:
            missing.append(name)
    assert not missing, f"modules missing from the docs: {missing}"


def test_every_tutorial_has_a_section(html):
    pages, _ = html
    for path in sorted((ROOT / "tutorials").glob("*.py")):
        assert "_downloads/" in pages["tutorials.html"] and path.name in pages["tutorials.html"], path


def _docstrings():
    for path in sorted(PACKAGE.rglob("*.py")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")           # invalid escapes are reported below instead
            tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    yield f"{path.relative_to(ROOT)}:{getattr(node, 'name', '<module>')}", doc


def test_docstrings_have_no_escape_characters():
    bad = [where for where, doc in _docstrings() if re.search(r"[\a\b\f\v\r\t]", doc)]
    assert not bad, f"docstrings with a control character (an unescaped backslash, e.g. \\theta or \\frac): {bad}"


def test_param_fields_name_one_parameter():
    bad = [f"{where}: {m.group(0)}" for where, doc in _docstrings()
           for m in re.finditer(r":param [\w*]+,[^:]*:|\S[ \t]+:param \w+:", doc)]
    assert not bad, f"parameter fields Sphinx misreads (one ':param name:' per parameter, each on its line): {bad}"


TRICKY_MARKDOWN = """# A title with `code` and *emphasis*

Text with `PyroModule`s, snake_case_names_, a trailing_ underscore, a * star, |pipes|, <angles>,
[a link](https://example.org/a_b), [an anchor](#the-main-job), **bold `x`**, $\\\\alpha_1$ inline and
2. a number that is no list, .. no directive, :no: field, >>> no doctest.

1. a numbered item with $x^2$
2. another, running
   onto a second line
- then a bullet
* and another

A formula in a paragraph, $$H = G + A, \\\\qquad G = \\\\sum_n J_n^\\\\top \\\\Lambda_n J_n,$$ then more text.

### A heading that skips a level

| a | | c |
|---|---|---|
| `x` | | 3 |
| short row |

```python
x = 1  # code
```

```
```

> a quote
"""


def test_markdown_reader_writes_clean_rest():
    """Whatever Markdown the README, docs/*.md and the tutorials hold becomes reST without a
    warning: everything but the Markdown it knows is escaped."""
    from docutils.core import publish_doctree
    from docutils.utils import Reporter

    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        reader = importlib.import_module("pyro_subnet_docs")
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    rst = "\n".join(reader.markdown_to_rst(TRICKY_MARKDOWN))
    doctree = publish_doctree(rst, settings_overrides={"doctitle_xform": False, "report_level": Reporter.SEVERE_LEVEL + 1,
                                                       "halt_level": Reporter.SEVERE_LEVEL + 1})
    problems = [m.astext() for m in doctree.findall(lambda n: n.tagname == "system_message")]
    assert not problems, rst + "\n" + "\n".join(problems)
    text = doctree.astext()
    for shown in ["PyroModules", "snake_case_names_", "a * star", "|pipes|", "<angles>", "2. a number",
                  ".. no directive", ":no: field", ">>> no doctest", "a link", "an anchor", "x = 1  # code"]:
        assert shown in text, shown
    assert [n.tagname for n in doctree.findall(lambda n: n.tagname in ("math", "math_block"))] == \
        ["math", "math", "math_block"]
    assert len(list(doctree.findall(lambda n: n.tagname == "section"))) == 2
