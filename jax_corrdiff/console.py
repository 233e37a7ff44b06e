"""Terminal output of the command-line tools."""

import contextlib
import logging
import sys
from collections.abc import Iterator

from absl import logging as absl_logging


def log_progress_to_stdout() -> logging.Logger:
    """Progress lines of the "jax_corrdiff" logger on stdout; absl (and the Orbax chatter that
    goes through it) only from WARNING up."""
    log = logging.getLogger("jax_corrdiff")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    absl_logging.set_verbosity(absl_logging.WARNING)
    return log


@contextlib.contextmanager
def exit_on(*errors: type[Exception]) -> Iterator[None]:
    """Within it, ``errors`` (what a user gave the command does not fit: a missing file, data
    that does not match the config, a checkpoint that is not one) end the command with
    ``error: MESSAGE`` on stderr and exit status 1, not a traceback: each message names the
    file and what is wrong with it."""
    try:
        yield
    except errors as error:
        sys.exit(f"error: {error}")
