"""Replicas of one program (fedkd.tasks.replicas, fedkd.main --seeds / --replica_config) used the ways a user
gets wrong: a grid over a key the config never reads, DP statistics in a round that dropped a client, a replica
set resumed with one more seed, two replicas in one folder, a stop requested while the set was restoring. The
reference is each replica's own single run (fedkd.tasks.fedavg.run) or the files on disk."""

import json
import os

import numpy as np
import pytest

from fedkd.config import ConfigError
from fedkd.preemption import Stopped
from fedkd.tasks import fedavg, replicas
from test_training import tiny_config

TINY = [
  "--config=configs/quickstart.py",
  "--config.image_size=32",
  "--config.num_clients=4",
  "--config.clients_per_round=2",
  "--config.local_steps=1",
  "--config.batch_size=2",
  "--config.model.width=4",
  "--config.model.depth=1",
  "--config.model.groups=2",
  "--config.eval.examples_per_site=2",
  "--config.eval.max_sites=1",
]


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _files(root):
  """{relative path: bytes} of every file under ``root``."""
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = f.read()
  return out


def _one_line_error(p, phrase):
  assert p.code == 2 and not p.traceback, p.stderr
  err = p.stderr.strip().splitlines()[-1]
  assert err.startswith("fedkd: error:") and phrase in err, p.stderr


def test_a_grid_over_a_key_the_config_never_reads_is_refused(cli, tmp_path):
  """--replica_config=dp.noise_multiplier=0.5,2 with DP off (or FedProx's mu under FedAvg) ran N identical
  runs under N labels: the key is never read, so every replica's parameters were equal (0.0 apart)."""
  for key, values, because in (
    ("dp.noise_multiplier", (0.5, 2.0), "config.dp.enabled=False"),
    ("algorithm.prox_mu", (0.01, 0.1), "config.algorithm.name='fedavg'"),
  ):
    cs = [tiny_config(seed=0) for _ in values]
    for c, v in zip(cs, values):
      c[key.split(".")[0]][key.split(".")[1]] = v
    reason = replicas.why_not(cs)
    assert reason is not None and f"config.{key} differs" in reason and because in reason, reason
    with pytest.raises(ConfigError, match="never read"):
      replicas.run(cs, [str(tmp_path / "a"), str(tmp_path / "b")])
    assert not (tmp_path / "a").exists()
    # where the config reads it, the same grid is a replica set
    for c in cs:
      c.dp.enabled, c.algorithm.name = True, "fedprox"
    assert replicas.why_not(cs) is None
  p = cli.run("fedkd.main", [*TINY, f"--workdir={tmp_path / 'w'}", "--replica_config=dp.noise_multiplier=0.5,2"])
  _one_line_error(p, "config.dp.noise_multiplier differs between the runs but is never read")
  assert "launch.sweep" not in p.stderr  # as processes they would be as equal
  assert not (tmp_path / "w").exists()
  w = tmp_path / "x"
  p = cli.run("fedkd.main", [*TINY, f"--workdir={w}", "--seeds=0,1", f"--replica_workdirs={w}/a,{w}/b/../a/"])
  _one_line_error(p, f"--replica_workdirs names {w}/b/../a/ twice; give each replica its own workdir")
  assert not w.exists()


def test_dp_statistics_of_a_round_that_dropped_a_client_are_its_single_runs(tmp_path):
  """DP with engine.skip_nonfinite_clients: a client whose update is non-finite gets weight 0, and its
  single run leaves it out of dp/median_norm and dp/clipped_fraction. The replica counted it: median NaN
  and clipped fraction 0.5 where its single run wrote 4.44e7 and 1.0."""
  cs = []
  # 4.8e5: one of round 1's two clients diverges in its 3 local steps, the other does not (measured: 4.7e5-4.9e5 at
  # tiny_config's quantity-skewed client sizes; 4.6e5 drops none, 5.5e5 both)
  for lr in (4.8e5, 0.05):
    c = tiny_config(num_rounds=2, seed=0, local_steps=3)
    c.engine.skip_nonfinite_clients = True
    c.dp.enabled, c.dp.noise_multiplier, c.dp.clip_norm = True, 0.5, 0.1
    c.client_optimizer.learning_rate = lr
    cs.append(c)
  lines = []
  replicas.run(cs, [str(tmp_path / "a"), str(tmp_path / "b")], log=lines.append)
  single_lines = []
  fedavg.run(cs[0], str(tmp_path / "s"), log=single_lines.append)
  dropped = [ln for ln in single_lines if "dropped client(s)" in ln]
  assert dropped and dropped[0].startswith("round 1:"), single_lines  # the case this test is about
  assert any("dropped client(s)" in ln for ln in lines), lines
  got, want = _jsonl(tmp_path / "a" / "rounds.jsonl"), _jsonl(tmp_path / "s" / "rounds.jsonl")
  for g, w in zip(got, want, strict=True):
    for key in ("dp/median_norm", "dp/clipped_fraction", "dp/epsilon"):
      assert np.isfinite(g[key]) and g[key] == pytest.approx(w[key], rel=1e-5), (g["round"], key, g[key], w[key])
  # the one finite client was clipped: a fraction of 1, not 1/2 of both
  assert got[0]["dp/clipped_fraction"] == 1.0


def test_a_replica_set_resumed_with_one_more_seed_is_refused_with_the_groups(cli, tmp_path):
  """--seeds=0,1 trained to round 1, then --seeds=0,1,2: refused with one line that says which replica
  holds which round; the new seed's folder is not left behind (it kept an empty checkpoints/ folder) and the
  other replicas' files are untouched."""
  work = tmp_path / "w"
  p = cli.run("fedkd.main", [*TINY, f"--workdir={work}", "--config.num_rounds=1", "--seeds=0,1"])
  assert p.code == 0, p.stderr
  before = _files(work)
  p = cli.run("fedkd.main", [*TINY, f"--workdir={work}", "--config.num_rounds=2", "--seeds=0,1,2"])
  _one_line_error(p, "(no checkpoint: seed 2; round 1: seed 0, seed 1)")
  assert "resume one alone as a single run: the same --config with its values as --config.KEY=VALUE" in p.stderr
  assert sorted(os.listdir(work)) == ["seed-0", "seed-1"]
  assert _files(work) == before


def test_two_replicas_in_one_workdir_are_refused(tmp_path):
  """replicas.run with the same folder twice (also spelled differently) would write both replicas' files
  into it; refused before anything is made."""
  cs = [tiny_config(seed=s) for s in (0, 1)]
  for wds in ([tmp_path / "a", tmp_path / "a"], [tmp_path / "a", str(tmp_path / "x" / ".." / "a") + "/"]):
    with pytest.raises(ConfigError, match="replicas 0 and 1 have the same workdir"):
      replicas.run(cs, [str(w) for w in wds])
  assert os.listdir(tmp_path) == []


class _AlwaysStop:
  reason = "preempted"

  def requested(self, step):
    return True


def test_a_stop_requested_while_restoring_stops_at_the_saved_round(tmp_path):
  """A signal that arrives while the replicas restore: the set stops at the round it resumed from (saved
  already), as a single run does, instead of training (and compiling) one more round first."""
  cs = [tiny_config(num_rounds=1, seed=s) for s in (0, 1)]
  wds = [str(tmp_path / f"r{c.seed}") for c in cs]
  replicas.run(cs, wds, log=lambda _: None)
  for c in cs:
    c.num_rounds = 3
  with pytest.raises(Stopped) as e:
    replicas.run(cs, wds, log=lambda _: None, stop=_AlwaysStop())
  assert e.value.round == 1
  for w in wds:
    assert [r["round"] for r in _jsonl(os.path.join(w, "rounds.jsonl"))] == [1]
    assert sorted(d for d in os.listdir(os.path.join(w, "checkpoints")) if d.isdigit()) == ["1"]
