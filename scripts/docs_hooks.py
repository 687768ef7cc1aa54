"""Generate the documentation pages that must not drift from the code (an mkdocs hook).

At build time (`mkdocs build`, listed under `hooks:` in mkdocs.yml) three pages are made from
the code itself, not written by hand:

- ``cli.md``: ``weightbridge --help`` and ``weightbridge <command> --help`` for every
  subcommand, rendered from `weightbridge.cli.build_parser`;
- ``formats.md``: the format registry `weightbridge.io.FORMATS`, with each format module's
  suffixes, output names and docstring;
- ``examples.md``: examples/README.md's index and each script, with its source;

and the getting-started page shows the README's own two commands (`on_page_markdown`).

Run it alone to print a page: ``python scripts/docs_hooks.py cli|formats|examples``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Help is wrapped at this width whatever the terminal of whoever builds the docs.
HELP_WIDTH = 96


def cli_page() -> str:
    """The command line reference: every subcommand's ``--help``, from the parser."""
    from weightbridge.cli import build_parser

    parser = build_parser()
    _fix_width(parser)
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = [
        "# Command line reference",
        "",
        "Generated from the parser (`weightbridge.cli.build_parser`) each time the documentation",
        "is built, so it always says what `weightbridge <command> --help` says. Errors are one",
        "line on stderr with exit code 2; `diff` exits 1 when the checkpoints differ.",
        "",
        "Commands: " + ", ".join(f"[`{name}`](#weightbridge-{name})" for name in sub.choices) + ".",
        "",
        "## weightbridge",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
    ]
    for name, command in sub.choices.items():
        _fix_width(command)
        lines += [
            "",
            f"## weightbridge {name}",
            "",
            "```text",
            command.format_help().rstrip(),
            "```",
        ]
    return "\n".join(lines) + "\n"


def _fix_width(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = functools.partial(argparse.HelpFormatter, width=HELP_WIDTH)


def formats_page() -> str:
    """The formats table, from the registry, and each format module's own description."""
    from weightbridge.io import FORMATS

    rows, sections = [], []
    for entry in FORMATS.values():
        module = _format_module(entry.module)
        suffixes = ", ".join(f"`{s}`" for s in module.SUFFIXES) or "(directories)"
        writes = ", ".join(f"`{n}`" for n in entry.output_names) or "no"
        doc = inspect.getdoc(module) or ""
        summary = " ".join(doc.split("\n\n")[0].split())
        rows.append(f"| [`{entry.name}`](#{entry.name}) | {suffixes} | {writes} | {summary} |")
        sections += ["", f"## {entry.name}", "", f"Module `{module.__name__}`.", "", doc]
    head = [
        "# Formats",
        "",
        "Generated from the format registry (`weightbridge.io.FORMATS`) each time the",
        "documentation is built. Every format is read; the *writes* column lists the names",
        "`--format` takes for it (`convert --format NAME`). Detection looks at magic bytes and",
        "directory structure first; the suffix only breaks ties. A new format is one module and",
        "one `weightbridge.io.register_format()` call (see `ARCHITECTURE.md`).",
        "",
        "| format | suffixes | writes (`--format`) | what it is |",
        "|---|---|---|---|",
    ]
    return "\n".join(head + rows + sections) + "\n"


def _format_module(module: Any) -> Any:
    if isinstance(module, str):
        name = "weightbridge.io" + module if module.startswith(".") else module
        return importlib.import_module(name)
    return module


def examples_page() -> str:
    """examples/README.md, then each script's source (links point into this page)."""
    examples = ROOT / "examples"
    index = (examples / "README.md").read_text()
    scripts = sorted(examples.glob("*.py"))
    for script in scripts:
        index = index.replace(f"]({script.name})", f"](#{anchor(script.name)})")
    lines = [index.rstrip()]
    for script in scripts:
        lines += [
            "",
            f"## {script.name} {{#{anchor(script.name)}}}",
            "",
            "```python",
            script.read_text().rstrip(),
            "```",
        ]
    return "\n".join(lines) + "\n"


def anchor(script: str) -> str:
    """The anchor of a script's section: ``07_review_a_plan.py`` -> ``07-review-a-plan``."""
    return script.removesuffix(".py").replace("_", "-")


PAGES = {"cli.md": cli_page, "formats.md": formats_page, "examples.md": examples_page}


def on_files(files: Any, config: Any) -> Any:
    """mkdocs hook: add the generated pages to the site's files."""
    from mkdocs.structure.files import File

    if str(ROOT) not in sys.path:  # the package, when mkdocs runs from another directory
        sys.path.insert(0, str(ROOT))
    for name, make in PAGES.items():
        files.append(File.generated(config, name, content=make()))
    return files


# In a page, this line is replaced by the README's first ``bash`` block (its two commands).
README_COMMANDS = "<!-- README commands -->"


def readme_commands() -> str:
    """The README's first fenced ``bash`` block, fences included."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```bash\n")
    end = text.index("```", start + len("```bash\n"))
    return text[start : end + 3]


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """mkdocs hook: put the README's own commands where a page asks for them."""
    return markdown.replace(README_COMMANDS, readme_commands())


def on_config(config: Any) -> Any:
    """mkdocs hook: render docstrings' doctests as code; rebuild when the sources of the
    generated pages change (`mkdocs serve`)."""
    config.markdown_extensions.append(_doctest_extension())
    config.watch.extend(
        [
            os.fspath(ROOT / "weightbridge" / "cli.py"),
            os.fspath(ROOT / "examples"),
            os.fspath(ROOT / "README.md"),
        ]
    )
    return config


def _doctest_extension() -> Any:
    """A Markdown extension that fences doctests (``>>>`` lines and their output, up to a blank
    line) as ``pycon`` code. The docstrings hold bare doctests, which Markdown would otherwise
    read as nested block quotes, with ``["kernel"]`` taken for a link."""
    from markdown import Extension
    from markdown.preprocessors import Preprocessor

    class Doctests(Preprocessor):
        def run(self, lines: list[str]) -> list[str]:
            out: list[str] = []
            fence: str | None = None  # the opening fence of a code block we are inside
            in_doctest = False
            for line in lines:
                stripped = line.lstrip()
                if fence is None and stripped.startswith(">>>") and not in_doctest:
                    indent = line[: len(line) - len(stripped)]
                    out += ["", indent + "```pycon"]
                    in_doctest = True
                elif in_doctest and not stripped:
                    out.append(indent + "```")
                    in_doctest = False
                elif not in_doctest and stripped.startswith(("```", "~~~")):
                    fence = None if fence else stripped[:3]
                out.append(line)
            if in_doctest:
                out.append(indent + "```")
            return out

    class DoctestExtension(Extension):
        def extendMarkdown(self, md: Any) -> None:  # Markdown's name for it
            # Before fenced_code (priority 25), which then reads the fences added here.
            md.preprocessors.register(Doctests(md), "weightbridge_doctests", 27)

    return DoctestExtension()


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] + ".md" not in PAGES:
        sys.exit(f"usage: python {sys.argv[0]} {'|'.join(p[:-3] for p in PAGES)}")
    print(PAGES[sys.argv[1] + ".md"](), end="")
