"""A run of the same config on the same devices in one process reuses the jitted round program
(fedkd.tasks.fedavg._round_fn): JAX does not trace it again, and the run's numbers are those of the first run,
which built it; a config that changes the program gets its own."""

import json

from jax import monitoring

from fedkd.tasks import fedavg
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


def test_kept_round_functions_are_the_latest_few(monkeypatch):
  """Least recently used first out: a kept function is reused until ROUND_FNS_KEPT others were asked for since."""
  monkeypatch.setattr(fedavg, "_ROUND_FNS", type(fedavg._ROUND_FNS)())
  built = []

  def get(key):
    return fedavg._round_fn(key, lambda: built.append(key) or object())

  a = get("a")
  assert get("a") is a and built == ["a"]
  others = [get(f"k{i}") for i in range(fedavg.ROUND_FNS_KEPT - 1)]
  assert get("a") is a and len(built) == fedavg.ROUND_FNS_KEPT  # 'a' asked for again: the newest now
  get("new")  # the oldest, k0, dropped; 'a' kept
  assert get("a") is a and get("k1") is others[1] and len(built) == fedavg.ROUND_FNS_KEPT + 1
  assert get("k0") is not others[0] and built[-1] == "k0"
