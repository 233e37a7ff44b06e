"""Does the backend's compiler keep rematerialisation? A 16-layer MLP, remat off and on.

``jax.checkpoint`` recomputes each layer's forward ops in the backward pass and keeps XLA from
merging them with the forward pass's copies by an ``optimization_barrier`` on their inputs.
XLA:GPU expands the barriers after scheduling; XLA:CPU expands them early in its pipeline, and
its later simplification passes can then merge the recomputation back into the forward ops,
undoing the remat. This counts, in the compiled ENTRY computation: the ops producing an
activation-sized array (equal counts with and without remat = nothing is recomputed), how many
backward-tagged ops (``transpose(``) run before the last forward op, and the plan's temporary
bytes.

    python benchmarks/remat_schedule.py --out benchmarks/results/remat_schedule_cpu.json
"""

import argparse
import json
import platform

import jax
import jax.numpy as jnp

LAYERS, ROWS, WIDTH = 16, 4096, 256


def _layer(w, x):
    return jnp.tanh(jnp.tanh(x @ w) @ w.T @ w)


def _loss(ws, x, remat: bool):
    layer = jax.checkpoint(_layer) if remat else _layer
    for w in ws:
        x = layer(w, x)
    return jnp.sum(x**2)


def _activation_ops(hlo: str) -> int:
    """ENTRY ops whose result is one activation (ROWS x WIDTH float32)."""
    return sum(f" = f32[{ROWS},{WIDTH}]" in line for line in hlo[hlo.index("ENTRY") :].split("\n"))


def _backward_ops_before_forward_ends(hlo: str) -> int:
    """ENTRY ops tagged as the backward pass (``transpose(``) scheduled before the last forward op."""
    entry = [line for line in hlo[hlo.index("ENTRY") :].split("\n") if " = " in line and "op_name=" in line]
    names = [line.split('op_name="', 1)[1].split('"', 1)[0] for line in entry]
    forward = [i for i, name in enumerate(names) if "jvp(" in name and "transpose(" not in name]
    return sum(1 for name in names[: forward[-1]] if "transpose(" in name) if forward else 0


def measure(remat: bool) -> dict:
    ws = [jnp.full((WIDTH, WIDTH), 0.01) for _ in range(LAYERS)]
    x = jnp.ones((ROWS, WIDTH))
    compiled = jax.jit(jax.grad(lambda ws, x: _loss(ws, x, remat))).lower(ws, x).compile()
    hlo = compiled.as_text()
    return {
        "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
        "activation_ops": _activation_ops(hlo),
        "backward_ops_before_forward_ends": _backward_ops_before_forward_ends(hlo),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = jax.devices()[0]
    result = {
        "device": {"platform": device.platform, "kind": device.device_kind, "jax": jax.__version__},
        "machine": platform.platform(),
        "model": f"{LAYERS} layers of tanh(tanh(x W) W^T W), x {ROWS} x {WIDTH} float32",
        "activation_bytes": ROWS * WIDTH * 4,
        "rows": {name: measure(name == "full") for name in ("none", "full")},
    }
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
