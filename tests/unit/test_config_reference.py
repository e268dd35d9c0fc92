"""The configuration reference in the docs is what the key declarations generate."""
from __future__ import annotations

from pathlib import Path

from router.config.instances import INSTANCE
from router.config.reference import COMMAND, markdown, sections
from router.config.schema import keys_of
from router.config.top import Config

DOC = Path(__file__).resolve().parents[2] / "docs" / "reference" / "configuration.md"


def test_the_docs_page_is_the_generated_reference() -> None:
    assert DOC.exists() and DOC.read_text(encoding="utf-8") == markdown(), (
        f"{DOC.relative_to(DOC.parents[2])} differs from the key declarations in router/config/; regenerate it: {COMMAND}")


def test_every_block_and_every_key_has_its_row() -> None:
    text = markdown()
    titles = [title for title, _ in sections("Top level", "", keys_of(Config))]
    assert titles == ["Top level", "`router`", "`router.api_keys[]`", "`router.tracing`", "`sleep_manager`", "`residency`", "`residency.groups[]`", "`instances[]`", "`instances[].lora_adapters[]`",
                      "`kubernetes`"]
    for title, keys in sections("Top level", "", keys_of(Config)):
        block = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
        assert [line.split("`")[1] for line in block.splitlines() if line.startswith("| `")] == [k.name for k in keys]
    assert {k.name for k in INSTANCE} <= set(text.split("## `instances[]`", 1)[1].split("`"))


def test_cells_cannot_break_the_table() -> None:
    from router.config.reference import cell
    assert cell("a | b\n  c") == "a \\| b c"
