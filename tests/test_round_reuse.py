"""A run of the same config on the same devices in one process reuses the jitted round program
(fedkd.tasks.fedavg.ROUND_FNS, a fedkd.tasks.kept.Kept): JAX does not trace it again, and the run's numbers are
those of the first run, which built it; a config that changes the program gets its own."""

import json
import random

from jax import monitoring
import pytest

from fedkd.tasks import fedavg
from fedkd.tasks.kept import Kept
from test_training import tiny_config


def _run_counting_round_traces(config, workdir) -> tuple[int, list[dict]]:
  """(times the round function was traced, the run's metrics.jsonl records)."""
  traced = []

  def listen(event, duration, **kw):
    if event.endswith("jaxpr_trace_duration") and kw.get("fun_name") == "round_fn":
      traced.append(duration)

  monitoring.register_event_duration_secs_listener(listen)
  try:
    fedavg.run(config, str(workdir), log=lambda _: None)
  finally:
    monitoring.unregister_event_duration_listener(listen)
  with open(workdir / "metrics.jsonl") as f:
    return len(traced), [json.loads(ln) for ln in f]


def test_a_second_run_of_the_same_config_traces_no_round_and_gives_the_same_numbers(tmp_path):
  first = tiny_config(num_rounds=2, seed=7)
  first.eval.every = 1
  n_first, ref = _run_counting_round_traces(first, tmp_path / "first")
  assert n_first == 1 and [r["round"] for r in ref] == [0, 1, 2]
  n_again, again = _run_counting_round_traces(first, tmp_path / "again")
  assert n_again == 0 and again == ref
  other = tiny_config(num_rounds=2, seed=7)  # a learning rate is a constant of the round program
  other.eval.every = 1
  other.client_optimizer.learning_rate *= 2
  n_other, changed = _run_counting_round_traces(other, tmp_path / "other")
  assert n_other == 1 and changed[0] == ref[0] and changed[1:] != ref[1:]


def test_kept_values_are_the_latest_few_used():
  """Least recently used first out, against a list kept in order of use; a build that raises keeps nothing; a
  build may itself get other keys (FedEFM's programs get their models)."""
  rng = random.Random(0)
  for size in (1, 2, 4):
    kept, order, built = Kept(size), [], []
    for _ in range(200):
      key, n_built = rng.randrange(7), len(built)
      value = kept.get(key, lambda k=key: built.append(k) or ("v", k, len(built)))
      if key in order:  # kept: the value built when the key was last missing, nothing built now
        last_built = max(i + 1 for i, k in enumerate(built) if k == key)
        assert len(built) == n_built and value == ("v", key, last_built)
        order.remove(key)
      else:
        assert built[n_built:] == [key] and value == ("v", key, len(built))
      order = (order + [key])[-size:]
      assert len(kept) == len(order)
    assert sorted(kept._values) == sorted(order) and list(kept._values) == order
  kept = Kept(2)
  with pytest.raises(RuntimeError):
    kept.get("bad", lambda: (_ for _ in ()).throw(RuntimeError("build failed")))
  assert len(kept) == 0 and kept.get("bad", lambda: 1) == 1
  assert kept.get("outer", lambda: ("outer", kept.get("inner", lambda: "i"))) == ("outer", "i")
  assert list(kept._values) == ["inner", "outer"] and len(kept) == 2
  with pytest.raises(ValueError, match="at least 1"):
    Kept(0)
