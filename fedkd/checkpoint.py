"""Checkpoints: the only module that touches orbax.

A checkpoint holds the server state (params, server optimizer state, round, rng) and the config as
JSON. Saves are atomic (orbax writes to a temporary folder and renames), so an interrupted save never
looks like a finished one.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used with this run; the message says why and what to do."""


class Checkpointer:

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_round(self) -> int | None:
    return self._mngr.latest_step()

  def all_rounds(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, round_: int, state: Any, config: dict, data_state: dict | None = None) -> None:
    """Saves the server state, the config and the data pipeline's iterator state (JSON)."""
    self._mngr.save(round_, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config),
        data=ocp.args.JsonSave(data_state or {})))

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def _json_item(self, round_: int, item: str) -> dict:
    try:
      out = self._mngr.restore(round_, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
    except Exception as e:
      raise CheckpointError(f"checkpoint for round {round_} in {self.directory} is unreadable "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); move it away or use "
                            "a new --workdir") from None
    return dict(out[item])

  def saved_config(self, round_: int) -> dict:
    """The config JSON stored with the checkpoint of ``round_`` (read without touching the arrays)."""
    return self._json_item(round_, "config")

  def saved_data_state(self, round_: int) -> dict:
    """The data pipeline state stored with the checkpoint of ``round_``."""
    return self._json_item(round_, "data")

  def restore(self, round_: int, like: Any) -> tuple[Any, dict]:
    """Restores the state at ``round_`` into the structure, shapes and shardings of ``like``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
      out = self._mngr.restore(round_, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), config=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for mismatched or damaged trees
      raise CheckpointError(
          f"checkpoint for round {round_} in {self.directory} cannot be restored into this run's "
          f"model ({type(e).__name__}: {str(e).splitlines()[0][:300]}); use a new --workdir or the "
          "config the checkpoint was written with") from None
    return out["state"], dict(out["config"])

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def config_json(config) -> dict:
  """A JSON-safe dict of a ConfigDict."""
  return json.loads(config.to_json())
