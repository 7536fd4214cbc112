"""FedEFM's downstream stage as a user sets it up: scarce-data sizes against the training set, teacher KD at
scale 0 against the plain fine-tune, the KD scale chosen without the test split, and the contrast command
over pooled workdirs whose config.json is damaged."""

import json

import jax
import numpy as np
import pytest

from fedkd.config import ConfigError
from fedkd.models import init_model
from fedkd.tasks import fedefm as task

from test_fedefm_usage import tiny


def test_scarce_size_above_the_training_set_is_refused_before_anything_is_written(tmp_path):
  """A scarce-data size is the first n of the downstream.train_examples training images: a larger n
  silently trained on more target images than the full budget (an 'n4' column from 4 images next to a
  2-image full budget). Refused in one line naming both keys; a size equal to the set is accepted."""
  work = tmp_path / "fe"
  c = tiny(**{"downstream.train_examples": 2, "downstream.scarce_examples": "1,4"})
  with pytest.raises(ConfigError, match=r"scarce_examples='1,4' lists 4, more than config.downstream.train_ex") as e:
    task.Experiment(c, str(work))
  assert "\n" not in str(e.value) and "list sizes <= 2" in str(e.value)
  assert not work.exists()
  task.Experiment(tiny(**{"downstream.train_examples": 4, "downstream.scarce_examples": "1,4"}), str(work))


def _np_dice_mean(pred, masks) -> float:
  """Mean over catheter and guidewire of the per-image Dice 2|P & T| / (|P| + |T|) (1 when both are empty)."""
  pred, masks = np.asarray(pred), np.asarray(masks)
  out = []
  for k in (1, 2):
    p, t = (pred == k).reshape(len(pred), -1), (masks == k).reshape(len(masks), -1)
    inter, denom = (p & t).sum(1), p.sum(1) + t.sum(1)
    out.append(np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0).mean())
  return float(np.mean(out))


def test_kd_at_scale_zero_is_the_plain_fine_tune_and_the_scale_is_chosen_on_validation(tmp_path):
  """Teacher KD with kd_scales='0' (no adaptation) trains the student exactly as the plain fine-tune (same
  init, same batches): every score equal. With scales 0.1 and 1, every candidate student is scored on the
  validation images only, the one kept has the best validation Dice (numpy, first on a tie), and the test
  images are predicted once per setting, by that student."""
  c = tiny(**{"downstream.kd_scales": "0", "downstream.teacher_adapt_steps": 0, "downstream.probe": False})
  exp = task.Experiment(c, str(tmp_path / "a"), log=lambda _: None)
  foundation = jax.tree.map(np.asarray, init_model(c.teacher, 5)[2])
  plain, kd0 = exp.finetune(foundation, False, 0), exp.finetune(foundation, True, 0)
  assert kd0.pop("kd_scale") == {"full": 0.0, "n4": 0.0}
  assert kd0 == plain

  c = tiny(**{"downstream.teacher_adapt_steps": 0, "downstream.probe": False})
  exp = task.Experiment(c, str(tmp_path / "b"), log=lambda _: None)
  exp.build_models()
  x_val, y_val = exp.data.target(0, 2, c.downstream.val_examples)
  x_te, _ = exp.data.target(0, 1, c.downstream.test_examples)
  calls, predict = [], exp.predict

  def recording_predict(params, images):
    out = predict(params, images)
    split = [s for s, x in (("val", x_val), ("test", x_te)) if np.array_equal(np.asarray(images), np.asarray(x))]
    calls.append((split[0] if split else "other", params, out))
    return out

  exp.predict = recording_predict
  res = exp.finetune(foundation, True, 0)
  scales = task.kd_scales(c.downstream)
  assert [s for s, _, _ in calls] == (["val"] * len(scales) + ["test"]) * 2  # the full budget, then 4 images
  for i, setting in enumerate(("full", "n4")):
    block = calls[i * (len(scales) + 1) : (i + 1) * (len(scales) + 1)]
    val = [_np_dice_mean(out, y_val) for _, _, out in block[:-1]]
    best = int(np.argmax(val))
    assert res["kd_scale"][setting] == scales[best], (setting, val)
    tested, kept = jax.tree.leaves(block[-1][1]), jax.tree.leaves(block[best][1])
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(tested, kept))


def _record(seed: int, method: str, value: float) -> dict:
  return {"unseen_percent": 100.0, "method": method, "teacher_kd": False, "seed": seed, "foundation": value}


@pytest.mark.parametrize("damage", ["garbled", "list", "directory"])
def test_pooled_contrast_with_a_damaged_config_json_is_one_line_error(cli, tmp_path, damage):
  """fedefm_contrast pooling two workdirs reads their config.json to check they ran one config: a
  garbled file, a JSON list or a directory in its place gave a traceback (exit 1); now one line naming the
  file (exit 2), and nothing printed."""
  for k, name in enumerate(("w0", "w1")):
    (tmp_path / name).mkdir()
    recs = [_record(s, m, 0.1 * s + (m == "fedefm") * 0.01) for s in (2 * k, 2 * k + 1) for m in ("fedefm", "fedavg")]
    (tmp_path / name / "results_raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  (tmp_path / "w0" / "config.json").write_text(tiny().to_json())
  bad = tmp_path / "w1" / "config.json"
  if damage == "garbled":
    bad.write_text("{garbled")
  elif damage == "list":
    bad.write_text("[1, 2]")
  else:
    bad.mkdir()
  pooled = f"{tmp_path / 'w0'}:{{m}},{tmp_path / 'w1'}:{{m}}"
  r = cli.run("fedkd.tasks.fedefm_contrast", [f"--a={pooled.format(m='fedefm')}", f"--b={pooled.format(m='fedavg')}"])
  assert r.code == 2 and not r.traceback and r.stdout == "", r.stderr
  line = r.stderr.strip()
  assert "\n" not in line and f"{bad} is unreadable" in line, line
