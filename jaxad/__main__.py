"""The `jaxad` command: `jaxad <command> [flags]`, the same as `python -m jaxad.<command>`.

  jaxad train --config=configs/digits_vae.py --workdir=W
  jaxad evaluate --workdir=W
  jaxad predict --workdir=W --input=FOLDER
  jaxad export --workdir=W
  jaxad grid --config=configs/grid_digits.py --workdir=G
  jaxad bench --quick
  jaxad prepare --dataset=mnist --src=DIR --out=mnist.npz

Each command is its module run as `__main__` with the remaining arguments, so flags,
help (`jaxad train --help`) and errors are exactly those of the `python -m` form.
"""

import runpy
import sys

# command → the module `python -m` runs, and what it does (for `jaxad --help`).
COMMANDS = {
    "train": ("jaxad.train", "train a model into a workdir (resumes a stopped run)"),
    "evaluate": ("jaxad.evaluate", "score a split: every score, metrics, thresholds, report"),
    "predict": ("jaxad.predict", "score new images: labels at a threshold, overlays"),
    "export": ("jaxad.export", "write the scorer as StableHLO that runs with jax alone"),
    "grid": ("jaxad.grid", "train and evaluate many models in one compiled program"),
    "bench": ("jaxad.bench", "benchmarks: images/s and FLOP/s beside the references"),
    "prepare": ("jaxad.data.prepare", "build npz files from MNIST idx files or MedMNIST"),
}


def usage() -> str:
  width = max(map(len, COMMANDS))
  lines = ["usage: jaxad <command> [flags]   (jaxad <command> --help for its flags)", "",
           "commands:"]
  lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  """Runs `jaxad <command> ...` (the console script's entry point)."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  command = argv[1]
  if command not in COMMANDS:
    sys.exit(f"error: unknown command {command!r}; one of {', '.join(COMMANDS)} "
             "(jaxad --help says what each does)")
  module = COMMANDS[command][0]
  sys.argv = [f"jaxad {command}", *argv[2:]]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
