"""Checkpoints: orbax behind one small module, because its API moves.

Resume means exactly one thing, written here: restore the latest step found in
`WORKDIR/checkpoints` into the structure (and shardings) of a freshly built state.
Orbax writes each step to a temporary folder and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact. In a multi-process run every
process calls `save` and `restore` (orbax writes each process's shards and process 0 the
metadata, with barriers between), so the workdir must be one folder all processes see.
"""

import os

import jax
import orbax.checkpoint as ocp

from jaxad.errors import CheckpointError


class Checkpoints:
  """Saves and restores a train-state pytree under `workdir/checkpoints`."""

  def __init__(self, workdir: str, keep: int = 3):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state) -> None:
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, like, step: int | None = None):
    """Restores `step` (default: the latest) into the structure and shardings of `like`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}: train first "
                            "(python -m jaxad.train --workdir=...)")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f"the checkpoint at step {step} in {self.directory} does not match the "
          f"model built from the config ({type(e).__name__}: {str(e)[:300]}): use a new "
          "--workdir or the config the checkpoint was trained with") from None

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
