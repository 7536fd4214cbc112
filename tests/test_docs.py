"""The documentation stays true to the code: every config key is on docs/configs.md, the README stays
short, and no relative link in README.md or docs/*.md points to a missing file."""

import pathlib
import re

import ml_collections
import pytest

from fedkd import config

ROOT = pathlib.Path(__file__).resolve().parent.parent
README_MAX_LINES = 220


def _keys(node: ml_collections.ConfigDict, prefix: str = ""):
  for k, v in node.items():
    if isinstance(v, ml_collections.ConfigDict):
      yield from _keys(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}"


def _task_sections(text: str) -> dict[str, str]:
  """{task: the part of docs/configs.md under its '## Task `name`' heading}."""
  parts = re.split(r"^## Task `(\w+)`\s*$", text, flags=re.M)
  return dict(zip(parts[1::2], parts[2::2]))


def test_every_config_key_is_documented():
  sections = _task_sections((ROOT / "docs" / "configs.md").read_text())
  schemas = {c.task: c for c in config.schemas()}
  assert set(schemas) == {"fedavg", "fedefm"}
  for task, schema in schemas.items():
    assert task in sections, f"docs/configs.md has no '## Task `{task}`' section; run python docs/gen_configs.py"
    keys = list(_keys(schema))
    assert len(keys) > 20
    missing = [k for k in keys if f"`{k}`" not in sections[task]]
    assert not missing, (
      f"config keys of task {task!r} missing from docs/configs.md: {missing}; "
      "run python docs/gen_configs.py > docs/configs.md"
    )


def test_readme_is_short():
  lines = (ROOT / "README.md").read_text().splitlines()
  assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _links(text: str) -> list[str]:
  """Targets of the markdown links and images in ``text``, outside code blocks and code spans."""
  text = re.sub(r"```.*?```", "", text, flags=re.S)
  text = re.sub(r"`[^`\n]*`", "", text)
  return LINK.findall(text)


def _markdown_files():
  return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("md", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_exist(md):
  broken = []
  for target in _links(md.read_text()):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I) or target.startswith("#"):
      continue  # http:, https:, mailto: ... and anchors within the page
    path = (md.parent / target.split("#", 1)[0]).resolve()
    if not path.exists():
      broken.append(target)
  assert not broken, f"{md.relative_to(ROOT)} links to missing files: {broken}"


def test_link_pattern():
  text = "see [a](docs/a.md#x), ![img](../p.png \"t\") and [web](https://e.org) `[not](x)`\n```\n[no](y)\n```"
  assert _links(text) == ["docs/a.md#x", "../p.png", "https://e.org"]
