"""The documentation stays true to the code: every config key is on docs/configs.md, the README stays
short, and no relative link in README.md or docs/*.md points to a missing file."""

import os
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


# ---------------------------------------------------------------- the commands the docs show

ABSL_ENTRY_POINTS = ("fedkd.main", "fedkd.eval", "fedkd.data.preview")
ARGPARSE_ENTRY_POINTS = {"fedkd.data.tfds.build": "fedkd.data.tfds.build", "launch.sweep": "launch.sweep"}


def _doc_commands() -> list[tuple[str, list[str]]]:
  """(where, argv after 'python -m') of every command in a shell block of README.md, docs/*.md,
  launch/README.md and bench/README.md: continuation lines joined, comments and '[...]' optional
  brackets dropped, '&&' chains split."""
  import shlex

  files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "launch" / "README.md"]
  files.append(ROOT / "bench" / "README.md")
  out = []
  for md in files:
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", md.read_text(), flags=re.S):
      text = re.sub(r"\\\n\s*", " ", block)
      for line in text.splitlines():
        line = re.sub(r"\s#.*$", "", line).replace("[", "").replace("]", "")
        for part in line.split("&&"):
          if "python -m" not in part:
            continue
          words = shlex.split(part)
          if "python" in words and words[words.index("python") + 1 : words.index("python") + 2] == ["-m"]:
            i = words.index("python")
            out.append((f"{md.relative_to(ROOT)}: {part.strip()}", words[i + 2 :]))
  return out


def test_the_docs_show_commands():
  mods = {argv[0] for _, argv in _doc_commands()}
  assert {"fedkd.main", "fedkd.eval", "fedkd.data.tfds.build", "launch.sweep"} <= mods, mods


@pytest.mark.parametrize("where,argv", _doc_commands(), ids=lambda x: x if isinstance(x, str) else None)
def test_doc_command_names_real_modules_flags_config_files_and_keys(where, argv, monkeypatch):
  """Every ``python -m`` command in the docs: the module exists, every flag is one it defines, a
  ``--config=FILE[:ARG]`` loads, every ``--config.KEY`` is a key of that config, and a ``--round`` of
  the quickstart's workdir is a round the quickstart keeps a checkpoint of."""
  import importlib
  import importlib.util

  from absl import flags

  from fedkd import cli

  monkeypatch.syspath_prepend(str(ROOT))  # the commands run in the checkout's root (launch/ is a folder there)
  module, args = argv[0], argv[1:]
  assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
  opts = {a.split("=", 1)[0]: (a.split("=", 1)[1] if "=" in a else None) for a in args if a.startswith("--")}
  if module in ABSL_ENTRY_POINTS:
    importlib.import_module(module)
    unknown = [o for o in opts if not o.startswith("--config.") and o[2:] not in flags.FLAGS]
    assert not unknown, f"{where}: {module} has no flag {unknown}"
  elif module in ARGPARSE_ENTRY_POINTS:
    parser = importlib.import_module(ARGPARSE_ENTRY_POINTS[module])._parser()
    unknown = [o for o in opts if o not in parser._option_string_actions]
    assert not unknown, f"{where}: {module} has no option {unknown}"
  if "--config" in opts and module != "fedkd.data.tfds.build":  # build's --config is a TFDS builder config
    path, _, arg = opts["--config"].partition(":")
    config = cli._preload_config(str(ROOT / path), arg or None)
    for o in opts:
      if o.startswith("--config."):
        node = config
        for part in o[len("--config.") :].split("."):
          assert part in node, f"{where}: {path} has no key {o[2:]}"
          node = node[part]
  if module == "fedkd.eval" and "--round" in opts and opts.get("--workdir") == "runs/quickstart":
    qs = cli._preload_config(str(ROOT / "configs" / "quickstart.py"), None)
    n, every, keep = qs.num_rounds, qs.checkpoint.every, qs.checkpoint.max_to_keep
    saved = sorted(set(range(every, n + 1, every)) | {n})
    assert int(opts["--round"]) in saved[-keep:], f"{where}: the quickstart keeps rounds {saved[-keep:]} only"


# ---------------------------------------------------------------- docs/outputs.md


def documented_outputs(heading: str) -> set[str]:
  """The file names listed (first table column, in backticks, trailing '/' dropped) under the
  docs/outputs.md section whose heading contains ``heading``."""
  sections = re.split(r"^## ", (ROOT / "docs" / "outputs.md").read_text(), flags=re.M)
  found = [s for s in sections if heading in s.splitlines()[0]]
  assert len(found) == 1, f"docs/outputs.md: {len(found)} sections with {heading!r} in the heading"
  names = set()
  for line in found[0].splitlines():
    if line.startswith("| `"):
      for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
        names.add(name.rstrip("/").rsplit("/", 1)[-1])
  return names


def assert_outputs_documented(folder, heading: str, ignore=()) -> None:
  """Every entry of ``folder`` (a run's output folder) is listed in docs/outputs.md under ``heading``."""
  names = set(os.listdir(folder)) - set(ignore)
  missing = sorted(names - documented_outputs(heading))
  assert not missing, f"{folder} holds {missing}, not listed in docs/outputs.md under {heading!r}"


def test_outputs_doc_sections_parse():
  assert {"metrics.jsonl", "tb", "config.json", "checkpoints", ".lock"} <= documented_outputs("FedAvg-family")
  assert {"eval.json", "robustness.json", "predictions.png"} <= documented_outputs("fedkd.eval")


def test_readme_quickstart_block_is_what_the_generator_writes():
  """The README's quickstart output is docs/gen_readme_quickstart.py's block (not hand-edited): fed its
  own lines, the generator rebuilds it character for character, and the sentence under it quotes the
  table's mean row."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("gen_readme_quickstart", ROOT / "docs" / "gen_readme_quickstart.py")
  gen = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(gen)
  text = (ROOT / "README.md").read_text()
  start, end = text.index(gen.BEGIN), text.index(gen.END) + len(gen.END)
  current = text[start:end]
  lines = current.split("```")[1].strip("\n").splitlines()
  flat = current.replace("\n", " ")
  cpu = re.search(r"Measured on this CPU \((.*?)\) by", flat).group(1)
  packages = re.search(r"rewrites this block \((jax .*?)\)\.", flat).group(1)
  assert gen.block(lines, ".../runs/quickstart", cpu, packages) == current
  mean = next(ln for ln in lines if ln.startswith("mean (train sites)")).split()
  assert f"catheter {mean[3]}, guidewire {mean[4]}" in current
  assert gen.replace(text, current) == text
