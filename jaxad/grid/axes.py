"""Grid axes: what a robustness grid varies, and its plan of groups and members.

`config.grid.axes` maps axis names to tuples of values. Axes that leave every array
shape (and the compiled step) alone are *member* axes: the product of their values is
the K members of a group, trained together by one vmapped step. Every other axis is a
*group* axis: the product of their values gives groups that run one after another.

  axis            config key                                 kind
  seed            seed                                       member
  c               model.beta = 2·c (Gaussian σ² = c)          member
  beta            model.beta                                 member
  learning_rate   train.learning_rate                        member
  left_out_class  data.anomalous_classes = (v,)              member
  normal_class    data.normal_classes = (v,)                 member
  latent_dim      model.latent_dim                           group
  image_size      data.image_size                            group
  hidden          model.hidden                               group
  widths          model.widths                               group
  architecture    model.name                                 group
  a__b            any config key a.b (dots as '__')          member if in MEMBER_KEYS

Zimmerer et al.'s c is the decoder variance σ² of p(x|z) = N(g(z), c·I); jaxad's
Gaussian likelihood has σ² = β/2 on images in [-1, 1], so c = β/2 in those units. The
other likelihoods (bernoulli, gaussian_learned, discretized_logistic) have no fixed
variance: β is their KL weight (β = 1: the ELBO), and the c axis is refused for them.
Axes iterate in the order of the table (then generic keys by name), groups and members
as itertools.product over them.
"""

import copy
import dataclasses
import importlib.util
import itertools
import os

import ml_collections

from jaxad import config as config_lib
from jaxad.errors import ConfigError

# Config keys a member may change: they are read per member (traced or on the host),
# never baked into the compiled step.
MEMBER_KEYS = ("seed", "model.beta", "train.learning_rate", "data.anomalous_classes",
               "data.normal_classes", "train.min_delta", "train.plateau_patience",
               "train.plateau_factor", "train.early_stop_patience", "train.num_epochs",
               "train.num_steps")
# Friendly names: axis → config key.
ALIASES = {
    "seed": "seed", "c": "model.beta", "beta": "model.beta",
    "learning_rate": "train.learning_rate", "left_out_class": "data.anomalous_classes",
    "normal_class": "data.normal_classes", "latent_dim": "model.latent_dim",
    "image_size": "data.image_size", "hidden": "model.hidden", "widths": "model.widths",
    "architecture": "model.name",
}
EXCLUSIVE = (("c", "beta"), ("left_out_class", "normal_class"))


def default_grid() -> ml_collections.ConfigDict:
  """The `config.grid` fields, each commented."""
  g = ml_collections.ConfigDict()
  g.axes = ml_collections.ConfigDict()  # axis name → tuple of values (see jaxad.grid.axes)
  g.max_members = 0  # split a group into chunks of at most this many members (0 = no).
  g.keep_checkpoints = False  # keep each group's final stacked state (disk: K models).
  g.max_device_data_mb = 2048  # preprocessed splits are copied to every device; above
  # this size (MiB) the grid refuses, naming the key.
  g.figures = True  # DIR/figures/*.png and DIR/grid.html.
  return g


def with_grid(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """An experiment config plus the default `grid` section."""
  config.grid = default_grid()
  return config


def load_experiment(path: str) -> ml_collections.ConfigDict:
  """get_config() of the experiment file at `path` (a grid config's base experiment)."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"_jaxad_experiment_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@dataclasses.dataclass(frozen=True)
class Member:
  """One model of a group: its axis values and its own complete config."""
  index: int  # position in its group (the vmapped axis)
  values: dict  # member-axis name → value
  config: ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class Group:
  """Members that share every array shape, trained by one vmapped step."""
  index: int
  name: str  # folder name under DIR/groups
  values: dict  # group-axis name → value
  members: tuple[Member, ...]

  @property
  def config(self) -> ml_collections.ConfigDict:
    """The config of member 0: every group-level (non-member) key is the same in all."""
    return self.members[0].config


def config_key(axis: str) -> str:
  return ALIASES.get(axis, axis.replace("__", "."))


def is_member_axis(axis: str) -> bool:
  return config_key(axis) in MEMBER_KEYS


def _valid_axes_hint() -> str:
  return (f"use one of {list(ALIASES)} or a config key with dots written as '__' "
          "(e.g. train__min_delta)")


def _lookup(config, key: str):
  node = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return None, False
    node = node[part]
  return node, True


def _check_axis(config, axis: str, values) -> tuple:
  key = config_key(axis)
  _, found = _lookup(config, key)
  if not found or key.startswith("grid."):
    raise ConfigError(f"grid.axes.{axis}: {key!r} is not a config key; {_valid_axes_hint()}")
  if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not len(values):
    raise ConfigError(f"grid.axes.{axis}={values!r} must be a non-empty tuple of values, "
                      f"e.g. --config.grid.axes.{axis}='(1, 2)'")
  values = tuple(values)
  if len(set(map(repr, values))) != len(values):
    raise ConfigError(f"grid.axes.{axis}={values!r} repeats a value: list each value once")
  return values


def _assign(config, axis: str, value) -> None:
  """Sets the config key(s) of one axis to one value."""
  key = config_key(axis)
  if axis == "c":
    if config.model.likelihood != "gaussian":
      raise ConfigError(f"grid.axes.c needs model.likelihood='gaussian' (got "
                        f"{config.model.likelihood!r}, which has no fixed decoder "
                        "variance c); use grid.axes.beta (its KL weight) instead")
    value = 2.0 * float(value)
  elif axis == "left_out_class":
    config.data.normal_classes = ()
    value = (value,)
  elif axis == "normal_class":
    config.data.anomalous_classes = ()
    value = (value,)
  *path, last = key.split(".")
  node = config
  for part in path:
    node = node[part]
  if isinstance(node[last], float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(node[last], tuple) and isinstance(value, list):
    value = tuple(value)
  try:
    node[last] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f"grid.axes.{axis}: cannot set {key} to {value!r} ({e}): give "
                      f"values of the type of {key} ({type(node[last]).__name__})") from None


def axes(config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """The grid's axes in iteration order (table order, then generic keys by name)."""
  if "grid" not in config or "axes" not in config.grid:
    raise ConfigError("the config has no grid.axes: start the grid config from "
                      "jaxad.grid.axes.with_grid(...) and set grid.axes")
  given = dict(config.grid.axes.items())
  if not given:
    raise ConfigError("grid.axes is empty: name at least one axis, e.g. "
                      "--config.grid.axes.seed='(0, 1, 2)'")
  for pair in EXCLUSIVE:
    if all(a in given for a in pair):
      raise ConfigError(f"grid.axes sets both {pair[0]} and {pair[1]}, which set the same "
                        "config key: keep one")
  keys = {}
  for axis in given:
    key = config_key(axis)
    if key in keys:
      raise ConfigError(f"grid.axes.{axis} and grid.axes.{keys[key]} both set {key}: "
                        "keep one")
    keys[key] = axis
  order = [a for a in ALIASES if a in given] + sorted(a for a in given if a not in ALIASES)
  return {a: _check_axis(config, a, given[a]) for a in order}


def plan(config: ml_collections.ConfigDict) -> list[Group]:
  """The groups and members of the grid `config.grid` describes; every config validated.

  Raises ConfigError naming the axis for an unknown key, an empty or repeated value
  list, a value of the wrong type, or a member config that cannot train.
  """
  all_axes = axes(config)
  if config.model.family != "vae":
    raise ConfigError(f"grids train VAEs only (model.family={config.model.family!r}): set "
                      "model.family='vae'")
  if float(config.train.get("ema_rate", 0.0) or 0.0):
    raise ConfigError("grids do not keep parameter EMAs: set train.ema_rate=0")
  group_axes = {a: v for a, v in all_axes.items() if not is_member_axis(a)}
  member_axes = {a: v for a, v in all_axes.items() if is_member_axis(a)}
  chunk = int(config.grid.max_members)
  if chunk < 0:
    raise ConfigError(f"grid.max_members={chunk} must be >= 0 (0 = one chunk per group)")
  base = copy.deepcopy(config)
  groups = []
  for gvals in itertools.product(*group_axes.values()):
    gvalues = dict(zip(group_axes, gvals))
    members = []
    for mvals in itertools.product(*member_axes.values()):
      values = {**gvalues, **dict(zip(member_axes, mvals))}
      c = copy.deepcopy(base)
      for axis, value in values.items():
        _assign(c, axis, value)
      config_lib.validate(c)
      members.append((dict(zip(member_axes, mvals)), c))
    size = chunk or len(members)
    for start in range(0, len(members), size):
      part = members[start:start + size]
      groups.append(Group(
          index=len(groups), name=f"g{len(groups):03d}", values=gvalues,
          members=tuple(Member(i, v, c) for i, (v, c) in enumerate(part))))
  return groups


def describe(groups: list[Group]) -> dict:
  """A JSON-safe summary of the plan (saved in DIR so a resume can check it)."""
  return {"groups": [
      {"name": g.name, "values": jsonable(g.values),
       "members": [jsonable(m.values) for m in g.members]} for g in groups]}


def jsonable(value):
  """Tuples as lists, recursively (what JSON gives back)."""
  if isinstance(value, dict):
    return {k: jsonable(v) for k, v in value.items()}
  if isinstance(value, (tuple, list)):
    return [jsonable(v) for v in value]
  return value


def label(values: dict) -> str:
  """`a=1,b=2`: a member's or group's values for logs and plots."""
  return ",".join(f"{k}={short(v)}" for k, v in values.items()) or "-"


def short(value) -> str:
  """A compact text form of an axis value: 0.1, (3 5), conv_vae."""
  if isinstance(value, (tuple, list)):
    return "(" + " ".join(short(v) for v in value) + ")"
  return f"{value:g}" if isinstance(value, float) else str(value)
