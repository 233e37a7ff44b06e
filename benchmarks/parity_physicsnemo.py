"""Live parity check against PhysicsNeMo at the full Taiwan width.

Builds reference cases with an installed nvidia-physicsnemo (Taiwan widths: model_channels
128, channel_mult [1,2,2,2,2], num_blocks 4, attention at the coarsest level, 64x64 input,
12 inputs / 4 outputs) by running ``tests/fixtures/make_physicsnemo_fixtures.py --profile
taiwan`` with the PhysicsNeMo environment's Python (PyTorch never enters this process),
then replays every case through the imported JAX models and reports
max |jax - torch| / std(torch) per case.

    python benchmarks/parity_physicsnemo.py --physicsnemo-python /work/pnemo-venv/bin/python \
        [--cases forward|samplers|NAME,...] [--workdir /tmp/pn_taiwan] [--output results.json]

The fixture folder takes about 2 GB (each full-width .mdlus is ~320 MB).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from jax_corrdiff.interop import parity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tests", "fixtures", "make_physicsnemo_fixtures.py")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--physicsnemo-python", required=True, help="python of an env with torch + physicsnemo")
    ap.add_argument("--cases", default=None, help="forward | samplers | comma-separated case names")
    ap.add_argument("--workdir", default=None, help="fixture folder (reused if it holds a manifest)")
    ap.add_argument("--output", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    workdir = args.workdir or tempfile.mkdtemp(prefix="pn_taiwan_")
    if not os.path.exists(os.path.join(workdir, "manifest.json")):
        command = [args.physicsnemo_python, SCRIPT, "--profile", "taiwan", "--output", workdir, "--no-reload-check"]
        if args.cases:
            command += ["--cases", args.cases]
        subprocess.run(command, check=True)
    manifest = parity.read_manifest(workdir)
    results = {}
    for case in manifest["cases"]:
        start = time.time()
        ours, reference = parity.run_case(workdir, case)
        results[case["name"]] = parity.relative_error(ours, reference)
        print(
            f"{case['name']:32s} max|jax-torch|/std(torch) = {results[case['name']]:.2e}  ({time.time() - start:.1f} s)"
        )
    worst = max(results, key=results.get)
    print(
        f"worst: {worst} {results[worst]:.2e} "
        f"(profile {manifest['profile']}, physicsnemo {manifest['physicsnemo_version']})"
    )
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"profile": manifest.get("profile_config"), "relative_error": results}, f, indent=2)
    sys.exit(0 if results[worst] <= 1e-4 else 1)


if __name__ == "__main__":
    main()
