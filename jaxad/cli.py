"""What every jaxad binary does around its library call: logging, devices, errors, help.

One place, so train, evaluate, grid and bench log alike, start multi-process runs alike,
print a one-line `error: ...` (never a traceback) for a mistake in their input, and
print usage for `-h`, `--help` or `--helpfull` with exit code 0 and no other flag.

A binary adopts it in two lines:

  def main(argv):
    cli.check_no_args(argv)
    with cli.session():  # logging, devices (if it defines parallel's flags), errors
      result = library_function(FLAGS.config, FLAGS.workdir)
    print(summary(result))

  if __name__ == "__main__":
    cli.run(main)  # app.run(main), with help that exits 0

`exit_on_error()` alone maps the errors (e.g. around loading a config before
`cli.run`); `setup_logging()` alone sets up the "jaxad" logger. Flag mistakes (an
unknown `--config.*` key, a bad value, a config file that does not load) end the same
way, before main runs. `--verbose` prints the traceback as well.
"""

import contextlib
import logging
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence

from absl import app, flags
from absl import logging as absl_logging

from jaxad.errors import CheckpointError, ConfigError, DataError

# Mistakes in the input or a diverged run: the message says what to fix, a traceback
# into XLA or tf.data would not.
ERRORS = (ConfigError, DataError, CheckpointError, FloatingPointError)
# How a user asks for help, and the absl flag that prints it (absl has no -h).
_HELP_FLAGS = {"h": "--help", "?": "--help", "help": "--help", "helpshort": "--help",
               "helpfull": "--helpfull", "helpxml": "--helpxml"}
_handler: logging.Handler | None = None

flags.DEFINE_boolean("verbose", False, "On an error, print its full traceback as well as "
                     "the one-line message.")


def setup_logging(level: int = logging.INFO) -> logging.Logger:
  """The "jaxad" logger at `level`, one bare line per message on stderr; idempotent.

  Silences absl's INFO (orbax logs every save through it) and stops propagation, as
  absl's root handler would print every line a second time.
  """
  global _handler
  absl_logging.set_verbosity(absl_logging.WARNING)
  log = logging.getLogger("jaxad")
  if _handler is None or _handler not in log.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(_handler)
  log.propagate = False
  log.setLevel(level)
  return log


def error_message(e: BaseException) -> str:
  """`error: <message>` on one line (the type's name when the message is empty)."""
  text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
  return f"error: {text or type(e).__name__}"


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
  """Turns `ERRORS` into SystemExit("error: ..."): one line on stderr, exit code 1."""
  try:
    yield
  except ERRORS as e:
    _fail(e)


def _verbose() -> bool:
  """--verbose, also before the flags are parsed (errors while loading a config)."""
  if flags.FLAGS.is_parsed():
    return flags.FLAGS.verbose
  return any(a in ("--verbose", "--verbose=true", "--verbose=True") for a in sys.argv)


def _fail(e: BaseException, hint: str = "", message: str = ""):
  """Exits 1 with `message` or `error: <e>` plus `hint`; --verbose prints the traceback."""
  if _verbose():
    traceback.print_exception(e)
  raise SystemExit((message or error_message(e)) + hint) from None


@contextlib.contextmanager
def session() -> Iterator[logging.Logger]:
  """Logging, devices and errors around a binary's library call; yields the logger.

  Starts the multi-process run from parallel's flags when the binary defines them
  (`parallel.define_flags()`), after which only process 0 logs progress. tqdm bars and
  log lines share stderr without tearing.
  """
  from tqdm.contrib.logging import logging_redirect_tqdm

  log = setup_logging()
  with exit_on_error():
    if "coordinator_address" in flags.FLAGS:
      from jaxad import parallel
      parallel.initialize_from_flags()
      if not parallel.is_main_process():
        log.setLevel(logging.WARNING)
    with logging_redirect_tqdm([log]):
      yield log


def check_no_args(argv: Sequence[str]) -> None:
  """Raises app.UsageError for positional arguments (absl prints usage and exits 1)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")


def _help_flag(argv: Sequence[str]) -> str | None:
  for arg in argv[1:]:
    if arg == "--":
      break
    if arg.startswith("-") and arg.lstrip("-") in _HELP_FLAGS:
      return _HELP_FLAGS[arg.lstrip("-")]
  return None


def help_requested(argv: Sequence[str]) -> bool:
  """Whether argv asks for help (-h, --help, --helpfull, ...), so no other flag matters."""
  return _help_flag(argv) is not None


def run(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> None:
  """`app.run(main, argv)`, except that help prints usage and exits 0, never running main.

  absl's own help flags exit 1 and do not know `-h`; help is parsed on its own here, so
  required flags and flags that would fail to parse do not stand in its way.
  """
  argv = list(sys.argv if argv is None else argv)
  wanted = _help_flag(argv)
  if wanted is None:
    app.run(main, argv=argv, flags_parser=parse_flags)
    return
  app.define_help_flags()
  try:
    app.parse_flags_with_usage([argv[0], wanted])  # prints usage, then exits 1
  except SystemExit:
    pass
  sys.exit(0)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every mistake one `error: ...` line (exit 1).

  Config files load lazily in ml_collections; they are loaded here, so a missing or
  broken file fails with the flags, not from inside main.
  """
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 (a bad value or key)
    _fail_parsing(e, argv)
  _load_config_file()
  return rest


def _load_config_file() -> None:
  if "config" not in flags.FLAGS or flags.FLAGS["config"].value is None:
    return
  try:
    flags.FLAGS["config"].value.keys()  # loads the file (or raises its error)
  except Exception as e:  # noqa: BLE001 (a missing file, or one that fails)
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    path = getattr(flags.FLAGS["config"], "config_filename", "")
    _fail(e, message=f"error: cannot load --config={path}: "
          f"{lines[-1] if lines else type(e).__name__}")


def _fail_parsing(e: BaseException, argv: Sequence[str]):
  """A flag that does not parse: an unknown --config.* key is named, with absl's
  suggestion; anything else is its own message."""
  arg = _unknown_key(e, argv)
  if arg is None and isinstance(e, flags.Error):
    _fail(e, " (--help lists the flags; --verbose shows the traceback)")
  if arg is None:  # raised while the config file ran
    given = next((a for a in argv if a.startswith("--config=")), "--config")
    _fail(e, message=f"error: cannot load {given}: {type(e).__name__}: "
          + error_message(e).removeprefix("error: ") + " (--verbose shows the traceback)")
  suggestion = re.search(r'Did you mean "([^"]+)"', str(e))
  _fail(e, message=f"error: {arg}: the config has no such key"
        + (f" (did you mean {suggestion[1]!r}?)" if suggestion else "")
        + "; --helpfull lists every --config.* key")


def _unknown_key(e: BaseException, argv: Sequence[str]) -> str | None:
  """The `--config.a.b` override that names a key the config lacks, if that is `e`."""
  if not isinstance(e, (AttributeError, KeyError)):
    return None
  names = [a.split("=")[0] for a in argv if a.startswith("--config.")]
  return next((n for n in names
               if re.search(rf"\b{re.escape(n.split('.')[-1])}\b", str(e))), None)
