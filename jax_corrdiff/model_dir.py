"""Model directories: a trained or converted network that reloads without the config that built it.

Written by training's export and by ``python -m jax_corrdiff.convert``; read by generation
and by the diffusion stage (its frozen regression network):
    model_config.json   {"model": <model config>, "matmul_precision": "highest",
                         "conditioning": <ConditioningLayout> (trained models),
                         "source": {...provenance: data config, normalization, step...}}
    variables/          Orbax PyTree checkpoint of the Flax variables
    grid.npz            lat, lon (H, W) of the target grid (trained models)

``matmul_precision`` is the ``jax.default_matmul_precision`` the network was trained (or
validated) at; generation runs at it, so a GPU does not silently switch to TF32.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jax_corrdiff.data import relocate_shipped_paths
from jax_corrdiff.diffusion.conditioning import ConditioningLayout
from jax_corrdiff.distributed import barrier

CONFIG_FILE = "model_config.json"
VARIABLES_DIR = "variables"
GRID_FILE = "grid.npz"


@dataclasses.dataclass(frozen=True)
class SavedModel:
    """The contents of a model directory (variables as NumPy arrays once loaded)."""

    config: dict
    variables: Any
    matmul_precision: str
    conditioning: ConditioningLayout | None = None
    source: dict = dataclasses.field(default_factory=dict)
    grid: tuple[np.ndarray, np.ndarray] | None = None


def save_model(directory: str, model: SavedModel) -> None:
    """Write ``model`` to ``directory`` (created; it must not hold a model yet).

    Args:
        directory: the model directory.
        model: what to write; ``grid`` and ``conditioning`` are optional (converted models
            have neither).

    With several processes every process calls it with the same arguments: Orbax writes the
    variables once (process 0) and process 0 writes the small files; it returns on every
    process once the directory is complete.
    """
    directory = os.path.abspath(directory)
    multiprocess = jax.process_count() > 1
    if multiprocess:  # e.g. process 0 removing an earlier export must happen before the check below
        barrier(f"save_model start {directory}")
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(os.path.join(directory, VARIABLES_DIR)):
        raise FileExistsError(f"{directory} already holds a model; choose another output directory")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, VARIABLES_DIR), jax.tree_util.tree_map(np.asarray, model.variables))
    if jax.process_index() == 0:
        if model.grid is not None:
            np.savez(os.path.join(directory, GRID_FILE), lat=np.asarray(model.grid[0]), lon=np.asarray(model.grid[1]))
        meta = {"model": model.config, "matmul_precision": model.matmul_precision, "source": model.source}
        if model.conditioning is not None:
            meta["conditioning"] = model.conditioning.to_dict()
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2)
    if multiprocess:
        barrier(f"save_model done {directory}")


def load_model(directory: str) -> SavedModel:
    """Read a model directory written by ``save_model``."""
    directory = os.path.abspath(directory)
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{directory} is not a model directory: {CONFIG_FILE} is missing")
    with open(config_path) as f:
        meta = json.load(f)
    if "matmul_precision" not in meta:
        raise ValueError(f"{directory} was written by an older jax_corrdiff (no matmul_precision); export it again")
    barrier(f"load_model {directory}")  # Orbax's restore syncs with a collective: arrive together
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(os.path.join(directory, VARIABLES_DIR))
    source = meta["source"]
    if "data" in source:
        source = {**source, "data": relocate_shipped_paths(source["data"])}
    grid = None
    if os.path.exists(os.path.join(directory, GRID_FILE)):
        with np.load(os.path.join(directory, GRID_FILE)) as npz:
            grid = npz["lat"], npz["lon"]
    return SavedModel(
        config=meta["model"],
        variables=jax.tree_util.tree_map(np.asarray, variables),
        matmul_precision=meta["matmul_precision"],
        conditioning=ConditioningLayout.from_dict(meta["conditioning"]) if "conditioning" in meta else None,
        source=source,
        grid=grid,
    )
