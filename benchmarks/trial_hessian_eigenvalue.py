"""A trial: how near the search's eigenvalue diagnostic comes to the alpha Hessian's eigenvalues.

Runs ``compile-and-search`` on a spec (the quickstart by default; retraining
cut to one epoch, SavedModel only) and, at each search epoch's end, on the
diagnostic's own batch and weights, prints one JSON line (``EIGENVALUES``):

- ``lanczos``: the diagnostic (``dominant_ritz_value``) after 1 to
  ``--steps`` Hessian-vector products, from its own start;
- ``power``: the last of ``--steps`` power iterations from the same start,
  ``v . Hv`` of the last unit iterate (the diagnostic until 2026-12-06);
- ``full``: the eigenvalues of the full Hessian, column by column, each the
  central difference of two alpha gradients along one alpha (radius
  ``diagnostics.hessian_radius``): the dominant, the largest, the smallest,
  and the largest entry of ``H - H^T`` (the finite differences' asymmetry).

Each product is two passes, so the full Hessian of the quickstart's 224
alphas is 448 passes per epoch: the trial takes about 6 minutes on 2 cores.

    python benchmarks/trial_hessian_eigenvalue.py
"""

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default=os.path.join(HERE, "..", "examples", "quickstart.yaml"))
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    import numpy as np

    from keras_darts.runtime import bilevel as module
    from keras_darts.runtime.cli import compile_and_search_main

    diagnostic = module.Bilevel.alpha_hessian_eigenvalue

    def compared(self, batch, iterations=5, radius=1e-3, seed=0):
        value = diagnostic(self, batch, iterations, radius, seed)
        hessian_times = self.alpha_hessian_product(batch, radius)
        cache = {}  # the shorter Lanczos runs repeat the longer ones' first products

        def product(vector):
            key = vector.tobytes()
            if key not in cache:
                cache[key] = hessian_times(vector)
            return cache[key]

        rng = np.random.default_rng(seed)
        start = np.concatenate([rng.normal(size=tuple(a.shape)).ravel() for a in self.arch_vars])
        size = start.size
        lanczos = [module.dominant_ritz_value(product, start, steps) for steps in range(1, args.steps + 1)]
        vector = start
        for _ in range(args.steps):
            vector = vector / np.linalg.norm(vector)
            image = product(vector)
            power = float(vector @ image)
            vector = image
        hessian = np.array([product(column) for column in np.eye(size)])
        values = np.linalg.eigvalsh((hessian + hessian.T) / 2)
        print("EIGENVALUES", json.dumps({
            "diagnostic": value, "lanczos": lanczos, "power": power,
            "full": {"dominant": float(values[np.argmax(np.abs(values))]), "largest": float(values[-1]),
                     "smallest": float(values[0]), "asymmetry": float(np.abs(hessian - hessian.T).max())}}),
              flush=True)
        return value

    module.Bilevel.alpha_hessian_eigenvalue = compared
    with tempfile.TemporaryDirectory() as folder:
        sys.argv = ["compile-and-search", args.spec, "--run-dir", os.path.join(folder, "run"), "--no-progress",
                    "--set", "retrain.epochs=1", "--set", "export.formats=[saved_model]"]
        compile_and_search_main()


if __name__ == "__main__":
    main()
