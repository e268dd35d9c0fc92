"""The configuration reference, generated from the key declarations.

``python -m router.config.reference`` prints it as Markdown; the docs site's
docs/reference/configuration.md is that output, and a test fails when the two
differ, so the reference cannot drift from what the parser accepts.
"""
from __future__ import annotations

from typing import Iterator

from router.config.schema import Key, keys_of
from router.config.top import Config

#: The command that writes the docs page.
COMMAND = "python -m router.config.reference > docs/reference/configuration.md"

INTRO = f"""\
# Configuration reference

<!-- Generated from the key declarations in router/config/ by `{COMMAND}`; edit those, not this page. -->

One YAML file; `python -m router.render --check --config FILE` validates it
and prints its instances without writing anything. Every problem is printed
at once on stderr, the checks across instances (port clashes, duplicate names)
included: warnings first, each line starting with `warning:` (an unknown key,
with a did-you-mean; GPU memory fractions of instances on one GPU adding up
past 1.0 without kvcached; `CUDA_VISIBLE_DEVICES` given as indexes for some
instances and UUIDs for others; an engine lacking what its sleep API needs
while auto sleep is on), then errors, each starting with `error:` and naming
the file and the field (`error: config.yaml: instances[1].engine_args: no
'--port' given; ...`), then `Nothing was written.` and exit status 2.
Warnings alone do not stop it.

`example-config.yaml` is a commented example with every block.
"""


def cell(text: str) -> str:
    """`text` made safe for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def table(keys: tuple[Key[object], ...]) -> list[str]:
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    rows += [f"| `{k.name}` | {cell(k.kind.label)} | {cell(k.default_text)} | {cell(k.doc)} |" for k in keys]
    return rows


def sections(title: str, path: str, keys: tuple[Key[object], ...]) -> Iterator[tuple[str, tuple[Key[object], ...]]]:
    """(heading, keys) of a block and then of each block nested in it, depth first."""
    yield title, keys
    for k in keys:
        if k.kind.keys:
            name = f"{path}{k.name}{'[]' if k.kind.many else ''}"
            yield from sections(f"`{name}`", f"{name}.", k.kind.keys)


def markdown() -> str:
    parts = [INTRO]
    for title, keys in sections("Top level", "", keys_of(Config)):
        parts.append("\n".join([f"## {title}", "", *table(keys)]) + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(markdown(), end="")
