"""Convert between PhysicsNeMo checkpoints and jax_corrdiff model directories.

    python -m jax_corrdiff.convert --physicsnemo MODEL.mdlus --output DIR      # import
    python -m jax_corrdiff.convert --to_physicsnemo DIR --output MODEL.mdlus   # export

PyTorch is not needed either way. Importing reads the archive with a restricted unpickler
that refuses anything but tensor data (a checkpoint from the internet cannot run code), and
every size in the file is checked before memory is allocated for it. Exporting writes the
zip checkpoint torch.save writes, in a ``.mdlus`` that ``physicsnemo.Module.from_checkpoint``
loads (a regression network as CorrDiffRegressionUNet, a diffusion network as
EDMPrecondSuperResolution); models PhysicsNeMo cannot express are refused.
"""

from absl import app, flags, logging

from jax_corrdiff.console import exit_on
from jax_corrdiff.interop.errors import CheckpointFormatError, ReadLimits
from jax_corrdiff.interop.physicsnemo import MATMUL_PRECISION, convert
from jax_corrdiff.interop.physicsnemo_export import ExportError, write_mdlus
from jax_corrdiff.model_dir import SavedModel, load_model, save_model
from jax_corrdiff.models.factory import count_params

_PHYSICSNEMO = flags.DEFINE_string("physicsnemo", None, "PhysicsNeMo .mdlus checkpoint to import.")
_TO_PHYSICSNEMO = flags.DEFINE_string(
    "to_physicsnemo", None, "Model directory (e.g. WORKDIR/diffusion/model) to export as a .mdlus."
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "Model directory to write (import), or .mdlus file to write (export).", required=True
)
_MAX_GIB = flags.DEFINE_float(
    "max_checkpoint_gib",
    ReadLimits.max_bytes / 2**30,
    "Most tensor data (GiB) the checkpoint may make the reader hold in memory; larger files are refused.",
)
flags.mark_flags_as_mutual_exclusive(["physicsnemo", "to_physicsnemo"], required=True)


def _import() -> None:
    config, variables, archive = convert(_PHYSICSNEMO.value, limits=ReadLimits(max_bytes=int(_MAX_GIB.value * 2**30)))
    source = {
        "format": "physicsnemo",
        "path": archive.path,
        "class": archive.args["__name__"],
        "args": archive.args.get("__args__", {}),
        "metadata": archive.metadata,
    }
    save_model(_OUTPUT.value, SavedModel(config, variables, MATMUL_PRECISION, source=source))
    logging.info(
        "%s (%s, %d parameters) -> %s", archive.path, archive.args["__name__"], count_params(config), _OUTPUT.value
    )
    print(f"wrote {config['kind']} model ({count_params(config):,} parameters) to {_OUTPUT.value}")


def _export() -> None:
    model = load_model(_TO_PHYSICSNEMO.value)
    write_mdlus(_OUTPUT.value, model.config, model.variables)
    print(f"wrote {model.config['kind']} model ({count_params(model.config):,} parameters) to {_OUTPUT.value}")


@exit_on(CheckpointFormatError, ExportError, FileNotFoundError, FileExistsError)
def main(argv):
    del argv
    if _PHYSICSNEMO.value:
        _import()
    else:
        _export()


if __name__ == "__main__":
    app.run(main)
