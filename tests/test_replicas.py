"""Seeds and hyperparameters as replicas of one compiled program (fedkd.tasks.replicas, fedkd.main
--seeds / --replica_config): each replica equals its own single run (fedkd.tasks.fedavg.run, the
independent reference, where the learning rates and mu are Python constants), a stopped replica run
resumes exactly, and what cannot be a replica is refused with the reason."""

import json
import os

import jax
import numpy as np
import pytest

from fedkd.checkpoint import ResumeRefused
from fedkd.config import ConfigError
from fedkd.errors import DivergedError
from fedkd.preemption import Stopped
from fedkd.tasks import fedavg, replicas
from test_docs import assert_outputs_documented
from test_training import tiny_config


def _configs(seeds=(0, 1), **over):
  out = []
  for s in seeds:
    c = tiny_config(num_rounds=3, seed=s, **over)
    out.append(c)
  return out


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _max_diff(a, b):
  return max(
    jax.tree.leaves(jax.tree.map(lambda u, v: float(np.max(np.abs(np.asarray(u, float) - np.asarray(v, float)))), a, b))
  )


class _StopAt:
  def __init__(self, at):
    self.at, self.reason = at, None

  def requested(self, step):
    if step == self.at:
      self.reason = "preempted"
    return self.reason is not None


@pytest.fixture(scope="module")
def singles(tmp_path_factory):
  """Each seed run alone, the reference."""
  base = tmp_path_factory.mktemp("singles")
  return {
    c.seed: (fedavg.run(c, str(base / f"s{c.seed}"), log=lambda _: None), base / f"s{c.seed}") for c in _configs()
  }


# (algorithm, engine client layout, replica layout) -> per replica: (client lr, server lr, prox mu, DP noise
# multiplier, DP clip norm or None: no DP), or None: the config's values
HPARAMS = {
  ("fedavg", "auto", "unroll"): None,
  # auto: the replicas loop over one compiled round
  # z x C not exact in float32 (1.3 x 0.07, 0.7 x 0.3): the noise std must still be the single run's
  ("fedprox", "auto", "auto"): [(0.05, 1.0, 0.01, 1.3, 0.07), (0.02, 0.5, 0.2, 0.7, 0.3)],
  ("fedavg", "vmap", "vmap"): [(0.05, 0.7, 0.01, 0, None), (0.1, 1.0, 0.01, 0, None)],
}


@pytest.mark.parametrize("algorithm,layout,replica_layout", list(HPARAMS))
def test_each_replica_equals_its_single_run(singles, tmp_path, algorithm, layout, replica_layout):
  """Replica layouts: 'loop' (the default: the engine's compiled round called per replica), 'unroll'
  (every replica's round in one program), 'vmap' (the round vmapped over the replica axis: meant for
  accelerators). Two cases also differ in learning rates / mu / DP noise and clip (traced per-replica inputs
  against the single run's constants; each replica draws its own noise and keeps its own privacy
  accounting)."""
  configs = _configs()
  for c, hp in zip(configs, HPARAMS[algorithm, layout, replica_layout] or [None] * len(configs)):
    c.algorithm.name = algorithm
    c.engine.client_layout = layout
    if hp is not None:
      c.client_optimizer.learning_rate, c.server_optimizer.learning_rate, c.algorithm.prox_mu = hp[:3]
      if hp[4] is not None:
        c.dp.enabled, c.dp.noise_multiplier, c.dp.clip_norm = True, float(hp[3]), hp[4]
  if HPARAMS[algorithm, layout, replica_layout] is None:
    ref = singles
  else:
    ref = {
      c.seed: (fedavg.run(c, str(tmp_path / f"s{c.seed}"), log=lambda _: None), tmp_path / f"s{c.seed}")
      for c in configs
    }
  lines = []
  out = replicas.run(configs, [str(tmp_path / f"r{c.seed}") for c in configs], log=lines.append, layout=replica_layout)
  want_layout = "loop" if replica_layout == "auto" else replica_layout
  assert any(f"replicas as {want_layout}" in ln for ln in lines), lines[:3]
  for i, c in enumerate(configs):
    single, wd = ref[c.seed]
    # unroll: the same ops per replica (bitwise in practice); vmap: batched convolutions sum in another
    # order, float rounding that a larger learning rate carries further (1.1e-5 measured at lr 0.1)
    # the loop over one compiled round: bitwise, also with DP; unroll: one program of every replica's round,
    # which XLA may fuse otherwise (3e-8 measured)
    tol = 0.0 if replica_layout == "auto" else 1e-5 if layout == "auto" else 1e-4
    assert _max_diff(out[i]["state"]["params"], single["state"]["params"]) <= tol
    np.testing.assert_array_equal(np.asarray(out[i]["state"]["rng"]), np.asarray(single["state"]["rng"]))
    got, want = _jsonl(tmp_path / f"r{c.seed}" / "metrics.jsonl"), _jsonl(wd / "metrics.jsonl")
    assert [r["round"] for r in got] == [r["round"] for r in want] == [0, 2, 3]
    for g, w in zip(got, want):
      assert g.keys() == w.keys()
      for k in g:
        assert g[k] == pytest.approx(w[k], abs=1e-4), k
    got_r, want_r = _jsonl(tmp_path / f"r{c.seed}" / "rounds.jsonl"), _jsonl(wd / "rounds.jsonl")
    assert [r["clients"] for r in got_r] == [r["clients"] for r in want_r]  # each replica samples its own
    assert [r["loss"] for r in got_r] == pytest.approx([r["loss"] for r in want_r], abs=1e-5)
    if c.dp.enabled:  # the replica's own accounting and clipping statistics
      for key in ("dp/epsilon", "dp/median_norm", "dp/clipped_fraction"):
        assert [r[key] for r in got_r] == pytest.approx([r[key] for r in want_r], rel=1e-5), key
      assert got[-1]["dp/epsilon"] == pytest.approx(want[-1]["dp/epsilon"])
  # the seeds differ: different clients or data, different models
  assert _max_diff(out[0]["state"]["params"], out[1]["state"]["params"]) > 1e-3


def test_stopped_replicas_resume_like_the_uninterrupted_run(singles, tmp_path):
  configs = _configs()
  wds = [str(tmp_path / f"r{c.seed}") for c in configs]
  with pytest.raises(Stopped):
    replicas.run(configs, wds, log=lambda _: None, stop=_StopAt(1))
  assert all(os.path.isdir(os.path.join(w, "checkpoints", "1")) for w in wds)
  lines = []
  out = replicas.run(configs, wds, log=lines.append)
  assert any("resuming from round 1" in ln for ln in lines), lines
  for i, c in enumerate(configs):
    single, wd = singles[c.seed]
    assert _max_diff(out[i]["state"]["params"], single["state"]["params"]) < 1e-5
    assert [r["round"] for r in _jsonl(os.path.join(wds[i], "metrics.jsonl"))] == [0, 2, 3]
    assert_outputs_documented(wds[i], "with a FedAvg-family config")
  # a replica's workdir is an ordinary run's: the single-run code reads its checkpoint and config
  with pytest.raises(ResumeRefused, match="already holds round 3"):
    fedavg.run(tiny_config(num_rounds=2, seed=0), wds[0], log=lambda _: None)


def test_a_stop_between_the_replicas_saves_resumes_all_from_the_round_they_share(singles, tmp_path):
  """The replicas save one after another: a kill between them (reviewer: 1 of 4 random SIGKILLs) left seed 0 with
  round 2 and seed 1 with round 1, and every re-run was refused although both hold round 1. They resume from it
  (seed 0's round 2 removed, trained again to the same numbers) and end as the uninterrupted runs; a mix a stop
  between saves cannot leave (a round in between) stays refused."""
  configs = _configs()
  for c in configs:
    c.checkpoint.every, c.checkpoint.max_to_keep = 1, 3
  wds = [str(tmp_path / f"r{c.seed}") for c in configs]
  with pytest.raises(Stopped):
    replicas.run(configs, wds, log=lambda _: None, stop=_StopAt(2))
  import shutil

  shutil.rmtree(os.path.join(wds[1], "checkpoints", "2"))  # seed 1's save of round 2 never happened
  lines = []
  out = replicas.run(configs, wds, log=lines.append)
  assert any(ln.startswith("note: the run stopped between the replicas' saves of round 2: seed 0") for ln in lines)
  assert any("resuming from round 1" in ln for ln in lines), lines
  for i, c in enumerate(configs):
    single, _ = singles[c.seed]
    assert _max_diff(out[i]["state"]["params"], single["state"]["params"]) < 1e-5
    assert [r["round"] for r in _jsonl(os.path.join(wds[i], "rounds.jsonl"))] == [1, 2, 3]
  # seed 0 holds rounds 1 and 3, seed 1 round 2 only: not what a stop between saves leaves
  shutil.rmtree(os.path.join(wds[0], "checkpoints", "2"))
  shutil.rmtree(os.path.join(wds[1], "checkpoints", "3"))
  shutil.rmtree(os.path.join(wds[1], "checkpoints", "1"))
  for c in configs:
    c.num_rounds = 4
  with pytest.raises(ConfigError, match=r"different rounds \(round 2: seed 1; round 3: seed 0\)"):
    replicas.run(configs, wds, log=lambda _: None)


def test_what_cannot_be_a_replica_is_refused_with_the_reason(tmp_path):
  assert replicas.why_not(_configs()) is None
  assert "fewer than two" in replicas.why_not(_configs(seeds=(0,)))
  assert "runs 0 and 1 are the same run" in replicas.why_not(_configs(seeds=(1, 1)))
  a, b = _configs(seeds=(1, 1))
  b.client_optimizer.learning_rate = 0.5  # same seed, another learning rate: a grid point
  assert replicas.why_not([a, b]) is None
  assert replicas.varying([a, b]) == ["client_optimizer.learning_rate"]
  b.batch_size = 4
  assert "config.batch_size differs" in replicas.why_not([a, b])
  for key, value, phrase in (
    ("algorithm.name", "scaffold", "per-client state"),
    ("aggregator.name", "median", "aggregator 'median'"),
  ):
    cs = _configs()
    for c in cs:
      c[key.split(".")[0]][key.split(".")[1]] = value
    assert phrase in replicas.why_not(cs), key
  cs = _configs()
  for c in cs:
    c.dp.enabled, c.dp.target_epsilon = True, 8.0
  assert "a privacy budget (config.dp.target_epsilon)" in replicas.why_not(cs)
  cs = _configs()
  for c in cs:
    c.algorithm.name = "scaffold"
  with pytest.raises(ConfigError, match="cannot be replicas"):
    replicas.run(cs, [str(tmp_path / "a"), str(tmp_path / "b")])
  assert not os.path.exists(tmp_path / "a")


def test_cli_seeds_bad_input_is_one_line(cli, tmp_path):
  def main(*args):
    return cli.run("fedkd.main", ["--config=configs/quickstart.py", f"--workdir={tmp_path / 'w'}", *args], timeout=120)

  lr = "--replica_config=client_optimizer.learning_rate="
  for args, phrase in (
    (["--seeds=0,x"], "must be a comma list of integers"),
    (["--seeds=0,1", "--replica_workdirs=a"], "names 1 workdirs for 2 replicas"),
    (["--replica_workdirs=a,b"], "needs --seeds or --replica_config"),
    (["--replica_config=batch_size=2,4"], "may differ in client_optimizer.learning_rate"),
    ([lr + "0.1,fast"], "write KEY=V1,V2,... with numbers"),
    (["--seeds=0,1,2", lr + "0.1,0.2"], "3 value(s) of seed, 2 value(s) of client_optimizer.learning_rate"),
    (["--seeds=0", lr + "0.1,0.1"], "replicas 0 and 1 are the same run"),
    (["--seeds=3"], "give one run ({'seed': 3}); give two or more values, or run it without them"),
    # a second flag for the same key replaced the first one's values without a word
    ([lr + "0.1,0.2", lr + "0.3,0.4"], "client_optimizer.learning_rate is given twice"),
    # --seeds / --replica_config replaced a --config.KEY of the same key without a word
    (["--seeds=0,1", "--config.seed=5"], "--seeds=0,1 and --config.seed both set the seed"),
    ([lr + "0.1,0.2", "--config.client_optimizer.learning_rate=0.5"], "both set client_optimizer.learning_rate"),
    # each replica's values are validated, and the hint names the flag that gave the value
    ([lr + "0.1,-1"], "set client_optimizer.learning_rate in --replica_config to a value > 0"),
    (["--seeds=0,1", "--config.aggregator.name=median"], "cannot be replicas of one program: aggregator 'median'"),
  ):
    p = main(*args)
    assert p.code == 2 and not p.traceback, p.stderr
    assert p.stderr.strip().startswith("fedkd: error:") and phrase in p.stderr, p.stderr
  # FedEFM experiments: a KD-weight / learning-rate grid; the seeds are config.experiment.seeds
  for args, phrase in (
    (["--seeds=0,1"], "set --config.experiment.seeds=0,1 instead"),
    (["--replica_config=fedefm.moon_mu=0.1,0.2"], "may differ in fedefm.beta, fedefm.temperature"),
    # launch.sweep does not run FedEFM: the advice is distinct values, not launch.sweep
    (["--replica_config=fedefm.beta=0.5,0.5"], "are the same run ({'fedefm.beta': 0.5}); give each replica different"),
    (
      ["--replica_config=fedefm.beta=0.3,1.5"],
      "beta=1.5 must be a number in [0, 1]; set fedefm.beta in --replica_config",
    ),
  ):
    p = cli.run("fedkd.main", ["--config=configs/fedefm.py:tiny", f"--workdir={tmp_path / 'w'}", *args], timeout=120)
    assert p.code == 2 and not p.traceback, p.stderr
    assert p.stderr.strip().startswith("fedkd: error:") and phrase in p.stderr, p.stderr
  # nothing of a refused run is left behind, also when it was refused after its workdirs were made
  assert not (tmp_path / "w").exists()  # not even the empty --workdir above the replicas' folders


@pytest.mark.parametrize("lr", [1e9, 1e30])
def test_a_diverging_replica_stops_alone_and_nothing_of_its_bad_round_is_saved(singles, tmp_path, monkeypatch, lr):
  """Seed 0 at a learning rate that diverges, seed 1 at the config's: seed 0 stops before anything of its
  bad round is written and its rounds are no longer run, seed 1 trains to the end exactly as its single
  run, and the run ends in a DivergedError that names the diverged replica and the finished one. Adam steps of
  1e9 or 1e30 leave finite parameters whose outputs overflow: round 1's model was saved as the last good one
  and the run stopped in round 2, on its loss; it stops in round 1, on the outputs."""
  configs = _configs()
  configs[0].client_optimizer.learning_rate = lr
  how = r"training diverged by round 1: the model's outputs are not finite \(NaN/Inf\) on 2 of 2 held-out images"
  for c in configs:
    c.checkpoint.every = 1
  wds = [str(tmp_path / f"r{c.seed}") for c in configs]
  lines, calls = [], []
  make = replicas.engine.make_round_fn

  def counted(*args, **kw):  # the loop layout calls the compiled round once per replica and round
    fn = make(*args, **kw)
    return lambda *a: calls.append(1) or fn(*a)

  monkeypatch.setattr(replicas.engine, "make_round_fn", counted)
  with pytest.raises(DivergedError, match=how) as e:
    replicas.run(configs, wds, log=lines.append)
  msg = str(e.value)
  assert msg.startswith(f"seed 0, client_optimizer.learning_rate={float(lr)!r}: ") and "(finished: seed 1, " in msg, msg
  bad = int(msg.split("round ")[1].split(":")[0])
  assert len(calls) == 3 + bad, (len(calls), bad)  # seed 1's three rounds, seed 0's up to the diverged one
  assert any("the other replicas go on" in ln for ln in lines), lines
  saved = sorted(int(d) for d in os.listdir(os.path.join(wds[0], "checkpoints")) if d.isdigit())
  assert saved == list(range(1, bad))[-2:], (saved, bad)
  written = os.path.join(wds[0], "rounds.jsonl")
  assert [r["round"] for r in (_jsonl(written) if os.path.exists(written) else [])] == list(range(1, bad))
  # the other replica: every round, its final checkpoint, and its single run's numbers
  single, wd = singles[1]
  assert [r["round"] for r in _jsonl(os.path.join(wds[1], "rounds.jsonl"))] == [1, 2, 3]
  assert "3" in os.listdir(os.path.join(wds[1], "checkpoints"))
  got, want = _jsonl(os.path.join(wds[1], "metrics.jsonl"))[-1], _jsonl(wd / "metrics.jsonl")[-1]
  assert got["dice/catheter"] == pytest.approx(want["dice/catheter"], abs=1e-4)


def test_a_stop_signal_save_checks_each_replicas_outputs(tmp_path):
  """A stop signal after a round that is neither evaluated nor a checkpoint round: each replica's model is saved
  only where its outputs are finite. Seed 0's Adam steps of 1e30 leave finite parameters whose outputs overflow:
  it stops as diverged with nothing of round 1 written, and seed 1's round 1 is saved for the resume."""
  configs = _configs()
  configs[0].client_optimizer.learning_rate = 1e30
  for c in configs:
    c.eval.every = c.checkpoint.every = 10
  wds = [str(tmp_path / f"r{c.seed}") for c in configs]
  lines = []
  # not 'preempted ... re-run the same command to resume' (exit 0): that re-run is refused, the diverged replica
  # holding no round 1
  with pytest.raises(DivergedError) as e:
    replicas.run(configs, wds, log=lines.append, stop=_StopAt(1))
  assert "(preempted at round 1: the others (seed 1, client_optimizer.learning_rate=" in str(e.value), str(e.value)
  assert "resume them without the diverged replica(s)" in str(e.value)
  assert any(
    ln.startswith("seed 0, client_optimizer.learning_rate=1e+30: training diverged by round 1: the model's")
    and ln.endswith("the other replicas go on")
    for ln in lines
  ), lines
  assert not [d for d in os.listdir(os.path.join(wds[0], "checkpoints")) if d.isdigit()]
  assert not os.path.exists(os.path.join(wds[0], "rounds.jsonl")) or not _jsonl(os.path.join(wds[0], "rounds.jsonl"))
  assert "1" in os.listdir(os.path.join(wds[1], "checkpoints"))
  assert [r["round"] for r in _jsonl(os.path.join(wds[1], "rounds.jsonl"))] == [1]


def test_replica_workdirs_alone_need_no_workdir(cli, tmp_path):
  """--replica_workdirs names every replica's folder, so --workdir is not asked for; each folder gets its run."""
  a, b = tmp_path / "a", tmp_path / "b"
  # the tiny run of tests/test_replicas_usage.py (its programs are then compiled once per test suite)
  from test_replicas_usage import TINY

  p = cli.run("fedkd.main", [*TINY, "--config.num_rounds=1", "--seeds=0,1", f"--replica_workdirs={a},{b}"])
  assert p.code == 0, p.stderr
  for w, seed in ((a, 0), (b, 1)):
    assert json.loads((w / "config.json").read_text())["seed"] == seed
    assert len((w / "metrics.jsonl").read_text().splitlines()) >= 1
