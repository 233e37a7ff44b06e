"""Model directories: a trained or converted network that reloads without the config that built it.

Written by training's export and by ``python -m jax_corrdiff.convert``; read by generation
and by the diffusion stage (its frozen regression network):
    model_config.json   {"model": <model config>, "source": {...provenance, normalization...}}
    variables/          Orbax PyTree checkpoint of the Flax variables
    grid.npz            lat, lon (H, W) of the target grid (trained models)
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

CONFIG_FILE = "model_config.json"
VARIABLES_DIR = "variables"
GRID_FILE = "grid.npz"


def save_model(
    directory: str, model_config: dict, variables: Any, source: dict | None = None, grid: tuple | None = None
) -> None:
    """Write ``variables``, ``model_config`` and the (lat, lon) ``grid`` to ``directory``
    (created; must not hold a model).

    With several processes every process calls it with the same arguments: Orbax writes the
    variables once (process 0) and process 0 writes the small files; it returns on every
    process once the directory is complete.
    """
    directory = os.path.abspath(directory)
    multiprocess = jax.process_count() > 1
    if multiprocess:  # e.g. process 0 removing an earlier export must happen before the check below
        multihost_utils.sync_global_devices(f"jax_corrdiff save_model start {directory}")
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(os.path.join(directory, VARIABLES_DIR)):
        raise FileExistsError(f"{directory} already holds a model; choose another output directory")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, VARIABLES_DIR), jax.tree_util.tree_map(np.asarray, variables))
    if jax.process_index() == 0:
        if grid is not None:
            np.savez(os.path.join(directory, GRID_FILE), lat=np.asarray(grid[0]), lon=np.asarray(grid[1]))
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump({"model": model_config, "source": source or {}}, f, indent=2)
    if multiprocess:
        multihost_utils.sync_global_devices(f"jax_corrdiff save_model done {directory}")


def load_model(directory: str) -> tuple[dict, Any, dict]:
    """Returns (model config, variables as NumPy arrays, source metadata)."""
    directory = os.path.abspath(directory)
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{directory} is not a model directory: {CONFIG_FILE} is missing")
    with open(config_path) as f:
        meta = json.load(f)
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(os.path.join(directory, VARIABLES_DIR))
    return meta["model"], jax.tree_util.tree_map(np.asarray, variables), meta.get("source", {})


def load_grid(directory: str) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) of the target grid a model was trained on."""
    path = os.path.join(directory, GRID_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} has no {GRID_FILE}: it was not exported by training")
    with np.load(path) as grid:
        return grid["lat"], grid["lon"]
