"""Export a trained CorrDiff as an Earth2Studio package:
``python -m jax_corrdiff.export --workdir=DIR --output=PKG``.

PKG gets regression.mdlus and diffusion.mdlus (PhysicsNeMo 2.2.2 checkpoints, written without
torch), metadata.json, stats.json, output_latlon_grid.nc and invariants.nc: the layout
``earth2studio.models.dx.CorrDiff.load_model`` reads, and ``generate --model=PKG`` too.
Models the layout cannot express (patch-trained, lead-time, a regression global residual, a
grid not a multiple of the UNet's downsampling) are refused.
"""

from absl import app, flags

from jax_corrdiff.console import exit_on
from jax_corrdiff.interop.e2s_package import PackageError, write_package
from jax_corrdiff.interop.physicsnemo_export import ExportError

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding regression/ and diffusion/ models.")
_OUTPUT = flags.DEFINE_string("output", None, "Package directory to write (new or empty).")
flags.mark_flags_as_required(["workdir", "output"])


@exit_on(PackageError, ExportError, FileNotFoundError, FileExistsError)
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    write_package(_WORKDIR.value, _OUTPUT.value)
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
