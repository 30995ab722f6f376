"""MkDocs hook: the configuration reference is generated from what the code declares (cli.config.KEYS and the
commented default configuration), so the page cannot drift from what the CLI accepts."""
from __future__ import annotations

import re

import yaml

MARKER = "<!-- configuration-reference -->"
REGISTRIES = "<!-- registries -->"


def configuration_reference() -> str:
    """A table per section: key, default, what is allowed (the declared constraint), and the default file's comment."""
    from classaware_plugin.cli.config import KEYS, default_text, defaults

    comments: dict[str, str] = {}
    section = ""
    last = ""
    for line in default_text().splitlines():
        m = re.match(r"^(\s*)([a-z_]+):(.*?)(#\s*(.*))?$", line)
        if m:
            key = m.group(2)
            if not m.group(1):
                section = key if not m.group(3).strip() or m.group(3).strip().startswith("#") else ""
                last = key if not section else ""
            else:
                last = f"{section}.{key}"
            if m.group(5) and last:
                comments[last] = m.group(5).strip()
        elif line.strip().startswith("#") and last and line.startswith(" " * 10):
            comments[last] = comments.get(last, "") + " " + line.strip().lstrip("#").strip()
    values = defaults()
    sections: dict[str, list[str]] = {}
    for key in KEYS:  # grouped by section, in the order the sections first appear
        sections.setdefault(key.rpartition(".")[0], []).append(key)
    out: list[str] = []
    for sec, keys in sections.items():
        out += ["", f"### `{sec}`" if sec else "### Top level", "", "| key | default | allowed | what it does |",
                "|---|---|---|---|"]
        for key in keys:
            default = values[sec][key.rpartition(".")[2]] if sec else values[key]
            shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            text = comments.get(key, "").replace("|", "\\|")
            out.append(f"| `{key}` | `{shown}` | {KEYS[key].describe().replace('|', chr(92) + '|')} | {text} |")
    return "\n".join(out) + "\n"


def registries() -> str:
    """The data sets and models ``data.name`` and ``model.name`` accept, from their registries."""
    from classaware_plugin.data import DATASETS
    from classaware_plugin.models import MODELS

    lines = ["| `data.name` | what it is | `data` keys it reads |", "|---|---|---|"]
    lines += [f"| `{n}` | {e.description} | {', '.join(f'`{k}`' for k in e.config) or '-'} |"
              for n, e in sorted(DATASETS.items())]
    lines += ["", "| `model.name` | what it is |", "|---|---|"]
    lines += [f"| `{n}` | {e.description} |" for n, e in sorted(MODELS.items())]
    lines.append("| `package.module:callable` | your own builder, called with `num_classes` and `model.kwargs` |")
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 - MkDocs' hook signature
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, configuration_reference())
    if REGISTRIES in markdown:
        markdown = markdown.replace(REGISTRIES, registries())
    return markdown
