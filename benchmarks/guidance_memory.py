"""Memory of guided (ZSSD) sampling against the member batch size: the guidance gradient goes
back through the network at every step, so a step holds the network's activations for every
member sampled at once.

    python benchmarks/guidance_memory.py [--grid 448] [--width 32] [--member_batch_sizes 1,2,4,8] \\
        [--members 8] [--out benchmarks/results/guidance_memory_cpu.json]

For each member batch size the whole guided sampler (8 Heun steps, unified coordinate guidance
by 8, the ZSSD prior's blocks of ``configs/zssd_era5_uk.py`` at ``--width`` and ``--channel_mult``
levels, attention only in the bottleneck) is compiled
(not run) and XLA's memory plan read (``compiled.memory_analysis()``: temporaries, arguments,
outputs), with the guided and the unguided sampler side by side. On a GPU the same plan is what
the device must hold; this is the figure to size ``--member_batch_size`` by.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))

import harness  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import zssd_era5_uk  # noqa: E402

from jax_corrdiff.diffusion.conditioning import ConditioningLayout  # noqa: E402
from jax_corrdiff.diffusion.guidance import (  # noqa: E402
    GuidanceSchedule,
    Observation,
    cos_lat_weights,
    unified_operator,
)
from jax_corrdiff.diffusion.samplers import sample_ensemble  # noqa: E402
from jax_corrdiff.inference.generate import make_sampler  # noqa: E402
from jax_corrdiff.inference.zssd import PriorModel, make_guided_fn, observation_arguments  # noqa: E402
from jax_corrdiff.mesh import make_mesh  # noqa: E402
from jax_corrdiff.models.factory import build_model, init_variables  # noqa: E402

FACTOR = 8


def prior(height: int, width: int, channels: int, channel_mult: list[int]) -> PriorModel:
    """An untrained prior of the ZSSD architecture on a regular (height, width) grid."""
    layout = ConditioningLayout(("t2m",), (), ("orog", "land_frac"), cyclic_time=True)
    unet = zssd_era5_uk.get_config().prior.model.unet.to_dict()
    unet.update(model_channels=channels, channel_mult=channel_mult, attn_resolutions=[])
    config = dict(
        kind="diffusion",
        img_resolution=[height, width],
        out_channels=1,
        cond_channels=layout.cond_channels,
        compute_dtype="float32",
        unet=unet,
        sigma_data=0.5,
    )
    network = build_model(config)
    variables = init_variables(config, jax.random.key(0))
    lat, lon = np.meshgrid(np.linspace(60, 50, height), np.linspace(-5, 5, width), indexing="ij")
    return PriorModel(network, variables, layout, "float32", None, {}, lat, lon, "")


def unguided_fn(model: PriorModel, sampler, members: int, member_batch_size: int):
    """The same sampler without guidance: jit(variables, static, time features (1, 4), keys (1,))."""
    layout, shape = model.conditioning, (*model.lat.shape, 1)

    def generate(variables, static, time_features, keys):
        cond = layout.assemble(static[None], time_features=time_features)
        denoise = lambda x, sigma: model.network.apply(variables, x[None], cond, sigma[None])[0]  # noqa: E731
        return sample_ensemble(sampler, denoise, shape, keys[0], jnp.arange(members), member_batch_size)

    return jax.jit(generate)


def plan(model: PriorModel, members: int, member_batch_size: int, guided: bool) -> dict:
    """XLA's memory plan of one sampling call (one time, ``members`` members)."""
    shape = model.lat.shape
    sampler = make_sampler("stochastic", steps=8, sigma_max=80.0)
    static, features, keys = jnp.zeros((*shape, 2)), jnp.zeros((1, 4)), jax.random.split(jax.random.key(0), 1)
    if guided:
        op = unified_operator(FACTOR, shape)
        observation = Observation(op, jnp.zeros((*shape, 1)), cos_lat_weights(model.lat), shape, norm=1.0)
        schedule = GuidanceSchedule("sda", 1.0, sigma_y=0.05, gamma=1.0)
        fn = make_guided_fn(model, sampler, observation, schedule, members, member_batch_size, make_mesh(1))
        args = (model.variables, static, observation_arguments(observation), features, jnp.zeros((1, *shape, 1)), keys)
    else:
        fn, args = unguided_fn(model, sampler, members, member_batch_size), (model.variables, static, features, keys)
    start = time.perf_counter()
    memory = fn.lower(*args).compile().memory_analysis()
    return {
        "member_batch_size": member_batch_size,
        "guided": guided,
        "temp_bytes": int(memory.temp_size_in_bytes),
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "compile_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="448", help="H or HxW")
    parser.add_argument("--width", type=int, default=32, help="model_channels")
    parser.add_argument("--channel_mult", default="1,2,2,2,2", help="levels (5: a 28 x 28 bottleneck at 448)")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--member_batch_sizes", default="1,2,4,8")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    height, width = harness.parse_grid(args.grid)
    channel_mult = [int(m) for m in args.channel_mult.split(",")]
    model = prior(height, width, args.width, channel_mult)
    rows = []
    for mbs in (int(b) for b in args.member_batch_sizes.split(",")):
        for guided in (False, True):
            rows.append(plan(model, args.members, mbs, guided))
            r = rows[-1]
            print(f"mbs {mbs} {'guided  ' if r['guided'] else 'unguided'} temp {r['temp_bytes'] / 2**30:.2f} GiB")
    results = {
        "machine": harness.describe_machine(),
        "grid": [height, width],
        "width": args.width,
        "channel_mult": channel_mult,
        "members": args.members,
        "rows": rows,
    }
    if args.out:
        harness.write_results(args.out, results)


if __name__ == "__main__":
    main()
