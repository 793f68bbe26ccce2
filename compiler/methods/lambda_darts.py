"""Lambda-DARTS (Movahedi et al., "Lambda-DARTS: Mitigating Performance Collapse by Harmonizing Operation
Selection among Cells", ICLR 2023).

After the official code (dr-faustus/Lambda-DARTS, sota/cnn/model_search.py,
``get_perturbations`` and ``get_reg_grads``; sota/cnn/train_search.py,
``--corr_regularization``): the weight step adds a regulariser that
harmonises the cells' gradients with respect to their op weights:

1. each cell takes its own copy ``w_l`` of its type's ``softmax(alpha)``;
   the training loss's gradient ``g_l = dL/dw_l`` is taken for every cell;
2. each of the n normal cells gets a direction ``u_l`` (``harmonizing_directions``),
   scaled by ``c = 1 / (n (n - 1) / 2)``, one over the number of pairs:

   * ``corr`` (default): ``u_l = c / ||g_l|| (I - n_l n_l^T) s`` with
     ``n_m = g_m / ||g_m||`` and ``s = sum_m n_m``: the cells' common
     direction without its component along the cell's own;
   * ``signcorr``: ``u_l = c sum_{m != l} (1 - (g_l . g_m) / (|g_l| . |g_m|)
     sign(g_l) sign(g_m)) g_m / (|g_l| . |g_m|)``, elementwise;

   reduction cells get ``u = 0``;
3. with ``epsilon = epsilon_0 / ||u||`` (``u`` over all cells), the weight
   gradients gain ``lambda * (dL/dW(w - epsilon u) - dL/dW(w + epsilon u)) / (2 epsilon)``;
   the perturbation's size is ``epsilon_0``, but the term scales with
   ``||u||``, so ``c`` and the ``1 / ||g_l||`` factors matter;
4. ``lambda(e) = lambda_max e / (E - 1)`` (official 0.125, ramped linearly).

Each weight step costs two more forward and backward passes. Derivation is DARTS'.
"""

from keras import ops

from keras_darts.spec.model import LambdaDartsConfig

from .base import SearchMethod


class LambdaDarts(SearchMethod):
    name = "lambda_darts"
    schedule_names = ("lambda_weight",)
    harmonizes_cells = True

    def __init__(self, options=None, epochs=None):
        config = LambdaDartsConfig(**dict(options or {}))
        super().__init__({"lambda_max": float(config.lambda_max), "epsilon_0": float(config.epsilon_0),
                          "correlation": str(config.correlation),
                          "anneal_epochs": self.anneal_epochs(config.anneal_epochs, epochs)}, epochs)

    def schedule(self, epoch):
        last = self.options["anneal_epochs"] - 1
        if last <= 0:
            return {"lambda_weight": self.options["lambda_max"]}
        return {"lambda_weight": self.options["lambda_max"] * min(epoch, last) / last}


def harmonizing_directions(gradients, correlation="corr"):
    """The official perturbation direction ``u_l`` of each normal cell from the normal cells' ``gradients``.

    ``gradients`` holds ``dL/dw_l`` for each normal cell (tensors of one
    shape); ``correlation`` is ``corr`` or ``signcorr`` (see the module).
    One cell alone has no pair, and gets a zero direction.
    """
    count = len(gradients)
    if count < 2:
        return [ops.zeros_like(g) for g in gradients]
    scale = 2.0 / (count * (count - 1))
    tiny = 1e-12
    if correlation == "corr":
        norms = [ops.maximum(ops.sqrt(ops.sum(ops.square(g))), tiny) for g in gradients]
        units = [g / n for g, n in zip(gradients, norms)]
        total = sum(units[1:], units[0])
        return [scale / n * (total - ops.sum(total * u) * u) for u, n in zip(units, norms)]
    directions = []
    for i, g in enumerate(gradients):
        direction = ops.zeros_like(g)
        for j, h in enumerate(gradients):
            if i == j:
                continue
            abs_dot = ops.maximum(ops.sum(ops.abs(g) * ops.abs(h)), tiny)
            agreement = ops.sum(g * h) / abs_dot
            direction = direction + (1.0 - agreement * ops.sign(g) * ops.sign(h)) * h / abs_dot
        directions.append(scale * direction)
    return directions
