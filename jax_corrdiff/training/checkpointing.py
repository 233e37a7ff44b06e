"""Model directories: a model config and its variables, loadable without any config file.

Layout of a model directory:
    model_config.json   {"model": <model config>, "source": {...provenance...}}
    variables/          Orbax PyTree checkpoint of the Flax variables
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "model_config.json"
VARIABLES_DIR = "variables"


def save_model(directory: str, model_config: dict, variables: Any, source: dict | None = None) -> None:
    """Write ``variables`` and ``model_config`` to ``directory`` (created; must not hold a model)."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(os.path.join(directory, VARIABLES_DIR)):
        raise FileExistsError(f"{directory} already holds a model; choose another output directory")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, VARIABLES_DIR), jax.tree_util.tree_map(np.asarray, variables))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump({"model": model_config, "source": source or {}}, f, indent=2)


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
