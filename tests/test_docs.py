"""The README stays a front page that leads into the docs, and the docs stay true to the code.

Fast and in-process: files are read, links resolved on disk, and the GPU
page's config loaded by the same parser `render --check` uses. Whether the
site builds (every page in the nav, every link and anchor) is `mkdocs build
--strict`, run by .ci/docs.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from router.config import load_config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

#: The Quick start: exactly these two commands, character for character, in this order.
RUN_STACK = ("pip install -e . && python -m router.render --config example-config.yaml --sim"
             " && supervisord -c supervisor/supervisord.conf")
RUN_TESTS = "pip install -e '.[test]' && python -m pytest -q -n 2 -m \"not real_engine and not slow\""

#: `[text](target)` and `![alt](target)`; the target ends at the first space or ')'.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def section(text: str, heading: str) -> str:
    """The body of the `## heading` section, up to the next `## ` heading."""
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"no '## {heading}' section"
    return m.group(1)


def code_blocks(text: str, lang: str) -> list[str]:
    return [body.strip() for kind, body in FENCE.findall(text) if kind == lang]


def local_links(text: str) -> list[str]:
    """Link targets that are files of this repository (no scheme, no bare anchor), without their anchor."""
    targets = [t.split("#", 1)[0] for t in LINK.findall(text)]
    return [t for t in targets if t and "://" not in t and not t.startswith("mailto:")]


def test_readme_is_a_front_page_of_at_most_300_lines():
    lines = README.read_text().count("\n")
    assert lines <= 300, f"README.md has {lines} lines; move reference material into docs/ (at most 300)"


@pytest.mark.parametrize("page", [README, DOCS / "index.md"], ids=["README.md", "docs/index.md"])
def test_the_quick_start_is_exactly_the_two_commands(page: Path):
    blocks = code_blocks(section(page.read_text(), "Quick start"), "bash")
    assert blocks[:2] == [RUN_STACK, RUN_TESTS], (
        f"{page.name}: the Quick start must open with the two set-up commands, character for character")


def test_every_readme_link_into_docs_points_at_a_file():
    links = local_links(README.read_text())
    into_docs = [t for t in links if t.startswith("docs/")]
    assert into_docs, "README.md links to no page of docs/"
    missing = [t for t in links if not (ROOT / t).is_file()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_every_docs_page_is_in_the_nav():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def pages(item: object) -> list[str]:
        if isinstance(item, str):
            return [item]
        if isinstance(item, list):
            return [p for x in item for p in pages(x)]
        if isinstance(item, dict):
            return [p for x in item.values() for p in pages(x)]
        return []

    listed = set(pages(nav))
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert on_disk - listed == set(), "pages missing from mkdocs.yml's nav"
    assert listed - on_disk == set(), "nav entries with no page"


def test_the_gpu_page_config_loads_and_its_budget_adds_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The first config of "A GPU node from scratch": valid, no warning but the missing venvs, and each
    instance's gpu_memory_gb is its engine's fraction of the 80 GB the page works out."""
    blocks = code_blocks((DOCS / "gpu-node.md").read_text(), "yaml")
    assert len(blocks) == 1, "the GPU page has one YAML config"
    path = tmp_path / "node.yaml"
    path.write_text(blocks[0] + "\n")
    monkeypatch.setenv("KVROUTER_API_KEYS", "key-one,key-two")

    cfg = load_config(path, sim=True)

    assert [w for w in cfg.warnings if "venv_path" not in w] == []
    raw = yaml.safe_load(blocks[0])
    budget = raw["residency"]["gpu_memory_gb"]
    assert budget == 80
    held = 0.0
    for inst, loaded in zip(raw["instances"], cfg.instances):
        args = shlex.split(" ".join(inst["engine_args"]))
        flag = "--gpu-memory-utilization" if inst["engine"] == "vllm" else "--mem-fraction-static"
        fraction = float(args[args.index(flag) + 1])
        assert loaded.gpu_memory_gb == pytest.approx(fraction * budget), inst["name"]  # worked out from the flag
        held += loaded.gpu_memory_gb
    assert held == pytest.approx(72) and held <= budget
