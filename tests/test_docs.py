"""The README and docs/ stay true: generated settings, short README, links and paths that exist
inside the repository, the README's commands as CI runs them, one version."""

import re
import tomllib
from pathlib import Path

import pytest

from laion_dagster.core.settings_doc import REGENERATE, settings_markdown

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 200

# Inline links and images `[text](target)`, and reference definitions `[name]: target`.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]]+\]:\s*(\S+)",
                  re.M)
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.M | re.S)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
# Where paths inside the package are named from (`core/storage.py` means laion_dagster/core/...).
PACKAGE = ROOT / "laion_dagster"
NOT_SOURCE = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _prose(text: str) -> str:
    """The text without its fenced code blocks (a link in a code block is not a link)."""
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$",
                                                     _prose(page.read_text()), re.M)}


def _inside(path: Path) -> bool:
    return path.resolve().is_relative_to(ROOT)


def test_docs_settings_is_generated_from_the_settings_model():
    page = ROOT / "docs" / "settings.md"
    assert page.exists(), f"docs/settings.md is missing: run `{REGENERATE}`"
    assert page.read_text() == settings_markdown(), (
        f"docs/settings.md differs from the settings model: run `{REGENERATE}`")


def test_the_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move details to docs/")


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_link_points_at_a_file_in_the_repository(page: Path):
    problems = []
    for match in LINK.finditer(_prose(page.read_text())):
        target = match.group(1) or match.group(2)
        if re.match(r"https?://", target):
            continue  # a web page, not a file
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("/"):
            problems.append(f"{target}: not a path relative to the page")
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part) if path_part else page
        if not _inside(linked):
            problems.append(f"{target}: outside the repository")
        elif not linked.exists():
            problems.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            problems.append(f"{target}: no heading #{anchor} in {_name(linked.resolve())}")
    assert not problems, f"{_name(page)}: " + "; ".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_path_named_exists_in_the_repository(page: Path):
    """`../` never leaves the repository; a file named in `code` (`bench/field.py`,
    `core/storage.py` for laion_dagster/core/storage.py, `tests/scenarios/test_ui.py::test_x`) and a
    Markdown file named anywhere exist, so a renamed module or a folder outside the repository
    shows here."""
    text = page.read_text()
    prose = _prose(text)
    top = {p.name for p in ROOT.iterdir() if p.is_dir() and p.name not in NOT_SOURCE
           and not p.name.endswith(".egg-info")}
    inner = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name not in NOT_SOURCE}
    problems = []
    for match in re.finditer(r"(?:\.\./)+[\w./-]*", text):
        if not _inside(page.parent / match.group(0)):
            problems.append(f"{match.group(0)}: outside the repository")
    for span in CODE_SPAN.findall(prose):
        path = span.split("::", 1)[0].rstrip("/")
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)+", path):
            continue
        first = path.split("/", 1)[0]
        if first in top:
            named = ROOT / path
        elif first in inner:
            named = PACKAGE / path
        else:
            continue  # a path of the user's (`store_dir/<subset>/...`), not of the repository
        if not named.exists():
            problems.append(f"`{span}`: no such file")
    markdown_files = {p.name for p in ROOT.rglob("*.md")
                      if not NOT_SOURCE.intersection(p.relative_to(ROOT).parts)}
    for name in set(re.findall(r"(?<![\w/.-])([\w-]+\.md)\b", prose)):
        if name not in markdown_files:
            problems.append(f"{name}: no such file in the repository")
    assert not problems, f"{_name(page)}: " + "; ".join(problems)


def test_the_readmes_commands_are_those_ci_runs():
    """The demo and test commands of the README's first screen, byte for byte as .ci/run runs
    them."""
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.startswith("python3 -m venv")]
    assert len(ci) == 2, ".ci/run no longer runs the README's two commands"
    blocks = re.findall(r"^```bash\n(.*?)^```", README.read_text(), re.M | re.S)
    readme = {line for block in blocks for line in block.splitlines()}
    for command in ci:
        assert command in readme, f"README.md does not show, as CI runs it: {command}"


def _project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _same_release(stated: str, version: str) -> bool:
    """"0.2" states 0.2.x; "0.2.0" states exactly that."""
    return version.split(".")[:len(stated.split("."))] == stated.split(".")


def test_the_version_the_readme_states_is_the_packages():
    version = _project_version()
    stated = re.findall(r"\blaion-dagster (\d+(?:\.\d+)+)\b", README.read_text())
    wrong = [s for s in stated if not _same_release(s, version)]
    assert not wrong, (f"README.md says laion-dagster {', '.join(wrong)}; "
                       f"pyproject.toml says {version}")


def test_the_package_says_the_version_pyproject_says():
    import laion_dagster

    assert laion_dagster.__version__ == _project_version(), (
        f"laion_dagster.__version__ is {laion_dagster.__version__}, pyproject.toml says "
        f"{_project_version()}")
