"""Convert a PhysicsNeMo checkpoint into a jax_corrdiff model directory.

    python -m jax_corrdiff.convert --physicsnemo MODEL.mdlus --output DIR

PyTorch is not needed: the archive is read with a restricted unpickler that refuses
anything but tensor data (a checkpoint from the internet cannot run code), and every
size in the file is checked before memory is allocated for it.
"""

from absl import app, flags, logging

from jax_corrdiff.interop.errors import ReadLimits
from jax_corrdiff.interop.physicsnemo import MATMUL_PRECISION, convert
from jax_corrdiff.model_dir import SavedModel, save_model
from jax_corrdiff.models.factory import count_params

_PHYSICSNEMO = flags.DEFINE_string("physicsnemo", None, "PhysicsNeMo .mdlus checkpoint to convert.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Model directory to write.", required=True)
_MAX_GIB = flags.DEFINE_float(
    "max_checkpoint_gib",
    ReadLimits.max_bytes / 2**30,
    "Most tensor data (GiB) the checkpoint may make the reader hold in memory; larger files are refused.",
)


def main(argv):
    del argv
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


if __name__ == "__main__":
    app.run(main)
