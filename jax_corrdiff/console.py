"""Terminal output of the command-line tools."""

import logging
import sys

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
