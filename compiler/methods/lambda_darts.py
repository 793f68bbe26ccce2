"""Lambda-DARTS (Movahedi et al., "Lambda-DARTS: Mitigating Performance Collapse by Harmonizing Operation
Selection among Cells", ICLR 2023).

After the official code (dr-faustus/Lambda-DARTS, sota/cnn/model_search.py,
``get_reg_grads``; ``--corr_regularization corr``): the weight step adds a
regulariser that harmonises the cells' gradients with respect to their op
weights:

1. each cell takes its own copy ``w_l`` of its type's ``softmax(alpha)``;
   the training loss's gradient ``g_l = dL/dw_l`` is taken for every cell;
2. for each normal cell, ``u_l = s - (s . n_l) n_l`` with ``n_m = g_m / ||g_m||``
   and ``s = sum_m n_m`` over the normal cells (``corr``: the other cells'
   common direction, without its component along the cell's own);
   reduction cells get ``u = 0``;
3. with ``epsilon = epsilon_0 / ||u||`` (``u`` over all cells), the weight
   gradients gain ``lambda * (dL/dW(w - epsilon u) - dL/dW(w + epsilon u)) / (2 epsilon)``;
4. ``lambda(e) = lambda_max e / (E - 1)`` (official 0.125, ramped linearly).

Each weight step costs two more forward and backward passes. The official
``signcorr`` form is not implemented. Derivation is DARTS'.
"""

from keras_darts.spec.model import LambdaDartsConfig

from .base import SearchMethod


class LambdaDarts(SearchMethod):
    name = "lambda_darts"
    schedule_names = ("lambda_weight",)
    harmonizes_cells = True

    def __init__(self, options=None, epochs=None):
        config = LambdaDartsConfig(**dict(options or {}))
        super().__init__({"lambda_max": float(config.lambda_max), "epsilon_0": float(config.epsilon_0),
                          "anneal_epochs": self.anneal_epochs(config.anneal_epochs, epochs)}, epochs)

    def schedule(self, epoch):
        last = self.options["anneal_epochs"] - 1
        if last <= 0:
            return {"lambda_weight": self.options["lambda_max"]}
        return {"lambda_weight": self.options["lambda_max"] * min(epoch, last) / last}
