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
  return [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "launch" / "README.md",
    ROOT / "bench" / "README.md",
  ]


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


def _anchors(md: pathlib.Path) -> set[str]:
  """GitHub's anchors of the headings of ``md``: lower case, punctuation dropped, spaces to '-', '-1'... for
  repeats."""
  text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
  seen, out = {}, set()
  for heading in re.findall(r"^#{1,6}\s+(.*?)\s*$", text, flags=re.M):
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
    seen[slug] = seen.get(slug, 0) + 1
  return out


def test_anchor_rule():
  md = ROOT / "docs" / "engine.md"
  assert {"replicas-of-one-program-seeds-learning-rates", "measurements", "cpu"} <= _anchors(md)


@pytest.mark.parametrize("md", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_link_anchors_exist(md):
  """A link ``file.md#anchor`` (or ``#anchor``) names a heading of that file."""
  broken = []
  for target in _links(md.read_text()):
    path, _, anchor = target.partition("#")
    if not anchor or re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):
      continue
    page = (md.parent / path).resolve() if path else md
    if page.suffix == ".md" and page.exists() and anchor not in _anchors(page):
      broken.append(target)
  assert not broken, f"{md.relative_to(ROOT)} links to missing headings: {broken}"


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


def _table_names(text: str, heading: str) -> set[str]:
  """The backticked names in the first column of the table under the markdown heading ``heading`` (any
  level) of ``text``, as written (``<run>/stdout.log`` stays whole)."""
  section = re.split(r"^#{1,6} " + re.escape(heading) + r"\s*$", text, flags=re.M)[1]
  section = re.split(r"^#{1,6} ", section, flags=re.M)[0]
  return {
    n for line in section.splitlines() if line.startswith("| `") for n in re.findall(r"`([^`]+)`", line.split("|")[1])
  }


def test_launch_readme_lists_every_file_a_sweep_writes_in_out():
  """launch/README.md's table of ``--out`` names every top-level entry docs/outputs.md lists for a sweep."""
  outputs = (ROOT / "docs" / "outputs.md").read_text()
  sweep_heading = next(h for h in re.findall(r"^## (.*)$", outputs, flags=re.M) if "launch.sweep" in h)
  top = {n for n in _table_names(outputs, sweep_heading) if not n.startswith("<run>/")}
  assert {"sweep.json", "results.md", "curves.png", "jax_cache/"} <= top, top
  listed = _table_names((ROOT / "launch" / "README.md").read_text(), "Outputs in `--out`")
  missing = sorted(top - listed)
  assert not missing, f"launch/README.md 'Outputs in --out' lacks {missing} (listed in docs/outputs.md)"


def test_list_configs_examples_parse():
  """Each way the docs show to list a dataset's configs is a command fedkd.data.tfds.build accepts."""
  import importlib
  import shlex

  build = importlib.import_module("fedkd.data.tfds.build")  # the package's ``build`` attribute is a function

  spans = [
    s
    for md in _markdown_files()
    for s in re.findall(r"`([^`\n]*--list_configs[^`\n]*)`", md.read_text())
    if "python -m" not in s or "fedkd.data.tfds.build" in s
  ]
  assert spans, "no doc shows --list_configs"
  for span in spans:
    argv = shlex.split(span.split("fedkd.data.tfds.build", 1)[-1].replace("NAME", "xray_folder"))
    try:
      args = build._parser().parse_args(argv)
    except SystemExit:
      pytest.fail(f"the docs show `{span}`, which fedkd.data.tfds.build refuses (usage error)")
    assert args.list_configs


def test_lock_message_example_is_the_codes(tmp_path, monkeypatch):
  """The 'in use by pid' example of docs/reliability.md has the form of the message a second
  ``python -m fedkd.main`` process gets (there sys.argv[0] is the path of fedkd/main.py)."""
  from fedkd import workdir
  from fedkd.errors import UserError

  doc = next(line for line in (ROOT / "docs" / "reliability.md").read_text().splitlines() if "is in use by pid" in line)
  wd = tmp_path / "runs" / "qs"
  wd.mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  main_py = str(ROOT / "fedkd" / "main.py")
  monkeypatch.setattr("sys.argv", [main_py, "--config=configs/quickstart.py", "--workdir=runs/qs"])
  holder = workdir.Lock("runs/qs")
  holder.acquire()
  try:
    with pytest.raises(UserError) as e:
      workdir.Lock("runs/qs").acquire()
  finally:
    holder.release()
  real = f"fedkd: error: {e.value}"

  def shape(msg: str) -> str:
    msg = re.sub(r"pid \d+ on host \S+", "pid P on host H", msg)
    msg = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "T", msg)
    return re.sub(r"\S*/fedkd/main\.py", "MAIN", msg)

  assert shape(doc) == shape(real), f"docs/reliability.md shows\n{doc}\nthe code prints\n{real}"


def test_replica_workdir_names_in_outputs_doc():
  """The replica workdir names docs/outputs.md gives are those ``fedkd.main --seeds / --replica_config``
  makes (``fedkd.sweep.run_names`` of the keys that vary)."""
  from fedkd.sweep import run_names

  text = (ROOT / "docs" / "outputs.md").read_text()
  assert "`<workdir>/seed-<s>/`" in text
  assert run_names([{"seed": 0}, {"seed": 1}]) == ["seed-0", "seed-1"]
  lr = "client_optimizer.learning_rate"
  examples = re.findall(r"`(?:<workdir>|\.\.\.)/(client_optimizer[^`/]*)/`", text)
  assert len(examples) == 2, f"docs/outputs.md shows no --replica_config workdir names: {examples}"
  assert examples[0] == run_names([{lr: 0.01}, {lr: 0.03}])[0]
  assert examples[1] == run_names([{lr: 0.01, "seed": 1}, {lr: 0.03, "seed": 2}])[0]


def test_sweep_command_from_any_folder(tmp_path):
  """launch/README.md: ``python -m fedkd.launch.sweep`` runs the sweep CLI from any folder (``launch.sweep``
  is found from the checkout's root)."""
  import subprocess
  import sys

  text = (ROOT / "launch" / "README.md").read_text()
  assert "`python -m fedkd.launch.sweep`" in text, (
    "launch/README.md does not say how to run a sweep outside the checkout"
  )
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  ok = subprocess.run(
    [sys.executable, "-m", "fedkd.launch.sweep", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
  )
  assert ok.returncode == 0 and "--aggregate_only" in ok.stdout, ok.stderr[-500:]


# ---------------------------------------------------------------- numbers the docs compute


def test_unseen_percent_source_counts_in_fedefm_doc():
  """docs/fedefm.md's ablation lists k, the sources per silo at each unseen %: k = T - round(x/100 (T - 1))
  with halves rounded up (hand formula), which is what the partition gives."""
  import math

  from fedkd.data import partition

  text = re.sub(r"\s+", " ", (ROOT / "docs" / "fedefm.md").read_text())
  m = re.search(r"T = (\d+): k = ([\d, ]+?) at ([\d, ]+?) %", text)
  assert m, "docs/fedefm.md no longer lists k per unseen % ('T = 6: k = ... at ... %')"
  t = int(m.group(1))
  ks = [int(v) for v in m.group(2).split(",")]
  percents = [int(v) for v in m.group(3).split(",")]
  assert len(ks) == len(percents) == 5
  by_hand = [t - math.floor(x / 100 * (t - 1) + 0.5) for x in percents]
  assert ks == by_hand, f"docs/fedefm.md says k = {ks} at {percents} %; T - round-half-up(x/100 (T-1)) = {by_hand}"
  assert [partition.unseen_types(t, x) for x in percents] == by_hand


def test_every_config_key_the_docs_name_exists():
  """Every ``config.KEY`` / ``--config.KEY`` in the docs' prose and code spans (not only in commands) is a key
  or group of one of the two task schemas (``fedkd.config.X`` functions and ``config.json`` aside)."""
  from fedkd import config as config_module

  def names(node, prefix=""):
    for k, v in node.items():
      yield prefix + k
      if isinstance(v, ml_collections.ConfigDict):
        yield from names(v, f"{prefix}{k}.")

  known = {n for schema in config_module.schemas() for n in names(schema)}
  unknown = []
  for md in _markdown_files():
    for m in re.finditer(r"(?<![\w/])(?:--)?config\.([a-z_]\w*(?:\.[a-z_]\w*)*)", md.read_text()):
      key = m.group(1)
      if key in ("json", "py") or hasattr(config_module, key.split(".")[0]):
        continue
      if key not in known:
        unknown.append(f"{md.relative_to(ROOT)}: config.{key}")
  assert not unknown, f"the docs name config keys no schema has: {unknown}"
