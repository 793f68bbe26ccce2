"""The bilevel DARTS iteration under ``tf.GradientTape``.

One iteration on a (train batch, alpha batch) pair, as the reference does it:

1. Architecture step (Adam on alpha) with one of
   * first order:   g = dL_val(w, a)/da
   * second order, finite difference (the paper's eq. 7-8, the default):
       w'  = w - eta (momentum m + dL_train(w, a)/dw + wd w)      (no clipping)
       v   = dL_val(w', a)/dw',   g1 = dL_val(w', a)/da
       R   = hvp_epsilon / ||v||,  w+- = w +- R v
       hvp = (dL_train(w+, a)/da - dL_train(w-, a)/da) / (2R)
       g   = g1 - eta hvp
   * second order, exact: g = d/da L_val(w'(a), a) = g1 - eta d/da[dL_train/dw . v],
     the mixed Hessian-vector product by double back-propagation (nested tapes).
   A latency-aware search (``latency``) turns g into the gradient of
   ProxylessNAS' objective of the validation loss and the expected latency.
   The search method's extra alpha loss (``method.alpha_loss``, e.g.
   beta-DARTS' regulariser), a function of alpha alone, adds its gradient.
2. Weight step (SGD on w) on the same train batch with the updated alpha.
   With ``reuse_virtual_gradient`` (an opt-in approximation, second order
   only) it applies the gradient the virtual step already took, at the alpha
   before its update: four passes instead of five.

Every pass is a Keras ``stateless_call`` on substituted weight and alpha
values: no copy of the model, no in-place perturbation. The passes are small
``tf.function``s (loss; loss and all gradients; loss and alpha gradients; the
mixed Hessian-vector product), each traced once and called with different
values, so a second-order iteration traces the network twice rather than
five times.
BN uses batch statistics in every pass. Under mixed precision the passes
compute in 16 bits, except the finite differences' perturbed passes, and
float16 scales every differentiated loss (``runtime/precision.py``).

What a pass computes on a batch is the ``objective``'s business: image
classification (a batch is ``(images, labels)``) or language modelling (a
batch is ``(tokens, targets, hidden state, seed)``; each pass returns the
hidden state it ends in, and draws its own dropout masks from the seed and
the pass number, as the reference samples fresh masks in every pass). The
recurrent variant (``unrolled_clip``) clips the virtual step's gradient and
``v`` to the weight optimiser's clipping norm and scales the Hessian-vector
product by the virtual step's clipping coefficient, as the reference's
recurrent search does.
"""

import contextlib
import functools

import numpy as np
import tensorflow as tf

from keras_darts.compiler.methods import clip_to_simplex, harmonizing_directions
from keras_darts.compiler.ops import replica_all_reduce, replica_batch_statistics, replica_index

from . import second_derivatives
from .distribution import ReplicaAllReduce, cross_replica_mean, replica_slices
from .graph_build import NestedFunction, StepFunction, accelerated, built_as_the_process_runs
from .objectives import ImageClassification
from .optimizers import clip_by_global_norm, clip_coefficient, elementwise, scalar
from .precision import computing_in, loss_scale_for

# Pass numbers: each pass of an iteration draws its own dropout masks.
PASS_VIRTUAL, PASS_PLUS, PASS_MINUS, PASS_WEIGHTS, PASS_VALIDATION = range(5)


def dense_gradients(gradients, variables):
    """Gradients with ``None`` (a variable the loss does not use) as zeros."""
    return [tf.zeros_like(v) if g is None else g for g, v in zip(gradients, variables)]


def dominant_ritz_value(product, start, steps):
    """The eigenvalue of largest magnitude (with its sign) of the symmetric operator ``product`` (vector to
    vector), from at most ``steps`` calls: Lanczos.

    The products span the Krylov subspace of ``start``; each new basis vector
    is orthogonalised against all before it, twice, and the operator's
    projection on the subspace (``Q^T A Q``) is formed from the products
    themselves and symmetrised, so that products with rounding or
    finite-difference error still give real Ritz values. Its eigenvalue of
    largest magnitude is returned. After ``k`` products this is the best
    estimate the ``k`` vectors allow, where power iteration keeps only the
    last one: the ratio of the two largest eigenvalues' magnitudes, which
    sets power iteration's pace, is close to 1 for a supernet's alphas,
    whose Hessian has eigenvalues of both signs (``benchmarks/README.md``).
    Stops early when the subspace is invariant (the whole space, at most).
    """
    basis, images = [], []
    vector = np.asarray(start, np.float64)
    for _ in range(min(steps, vector.size)):
        scale = np.linalg.norm(vector)
        for _ in range(2):
            for q in basis:
                vector = vector - (q @ vector) * q
        norm = np.linalg.norm(vector)
        if norm == 0.0 or norm <= 1e-10 * scale:
            break
        basis.append(vector / norm)
        images.append(np.asarray(product(basis[-1]), np.float64))
        vector = images[-1]
    if not basis:
        return 0.0
    projected = np.array(basis) @ np.array(images).T
    values = np.linalg.eigvalsh((projected + projected.T) / 2)
    return float(values[np.argmax(np.abs(values))])


class Bilevel:
    """The search model's variables, partitioned once by identity, and the passes over them."""

    def __init__(self, model, weights_optimizer, arch_optimizer, hvp_epsilon=0.01, objective=None,
                 unrolled_clip=None, strategy=None, reuse_virtual_gradient=False, batch_norm="global",
                 grappler=None, precision="float32", latency=None, concurrent_perturbed_passes=False):
        self.model = model
        # Latency-aware search (``runtime/latency.py``): turns the alpha step's task gradient into its objective's.
        self.latency = latency
        self.trainable = list(model.trainable_variables)
        arch_ids = {id(v) for v in model.arch_variables}
        self.arch_positions = [i for i, v in enumerate(self.trainable) if id(v) in arch_ids]
        self.weight_positions = [i for i, v in enumerate(self.trainable) if id(v) not in arch_ids]
        self.arch_vars = [self.trainable[i] for i in self.arch_positions]
        self.weight_vars = [self.trainable[i] for i in self.weight_positions]
        if not self.arch_vars:
            raise ValueError("The model has no architecture variables among its trainable variables.")
        if [id(v) for v in weights_optimizer.variables_list] != [id(v) for v in self.weight_vars]:
            raise ValueError("The weights optimiser must be built on the model's weight variables, in order.")
        if [id(v) for v in arch_optimizer.variables_list] != [id(v) for v in self.arch_vars]:
            raise ValueError("The architecture optimiser must be built on the model's alphas, in order.")
        self.weights_optimizer = weights_optimizer
        self.arch_optimizer = arch_optimizer
        self.hvp_epsilon = hvp_epsilon
        self.objective = objective or ImageClassification(model)
        self.unrolled_clip = unrolled_clip
        self.strategy = strategy
        self.replicas = strategy.num_replicas_in_sync if strategy is not None else 1
        if batch_norm not in ("global", "replica"):
            raise ValueError(f"batch_norm must be 'global' or 'replica'. Received: batch_norm={batch_norm!r}")
        self.batch_norm = batch_norm
        # global batch norm on a MirroredStrategy: the batch norms all-reduce without merge_call.
        self.all_reduce = (ReplicaAllReduce(strategy) if batch_norm == "global" and ReplicaAllReduce.available(strategy)
                           else None)
        # The graph optimiser for the compiled steps: None decides by the devices (graph_build).
        self.grappler = grappler
        self.reuse_virtual_gradient = reuse_virtual_gradient
        # Whether the builder asks for finite differences' perturbed passes to run at once where that
        # pays (``perturbed_passes_concurrent``).
        self.concurrent_perturbed_passes = concurrent_perturbed_passes
        # The model's layers compute in ``precision`` (runtime/precision.py); float16 scales its losses.
        self.precision = precision
        self.loss_scale = loss_scale_for(precision)
        if reuse_virtual_gradient and (unrolled_clip is not None or self.objective.regularized):
            raise ValueError("reuse_virtual_gradient needs a virtual step that takes the weight step's own gradient.")
        # Examples per batch on each replica, when every iteration's batches have that many (fix_batch_size).
        self.batch_size = None
        # The non-trainable variables' values while a pass shared by the replicas is traced (_shared_pass).
        self._state = None
        self.compile_passes()

    def fix_batch_size(self, global_batch):
        """Build the iteration's steps and passes for batches of exactly ``global_batch`` examples.

        A search's batches all have the spec's size (the last, smaller one of an
        epoch is dropped). With the batch dimension known when traced, the
        gradient code takes its static paths: a SMALL exact second-order step's
        double backward pass has a third fewer nodes and builds in two thirds of
        the time. Evaluation, outside the iteration, still takes any batch.
        """
        if global_batch % self.replicas:
            raise ValueError(f"a batch of {global_batch} does not split over {self.replicas} replicas")
        self.batch_size = global_batch // self.replicas
        self.compile_passes()

    @property
    def passes_inlined(self):
        """Whether the passes are traced into the step: global batch norm under a strategy other than mirrored."""
        return self.strategy is not None and self.batch_norm == "global" and self.all_reduce is None

    @property
    def perturbed_passes_concurrent(self):
        """Whether finite differences' two perturbed passes (at ``w + R v`` and ``w - R v``) run at once.

        They are independent; by default the second waits for the first, so that one pass's activations
        are held at a time. A builder whose passes are long chains of small kernels, each pass keeping one
        core busy (the recurrent cell over time), asks for them to run at once; that is done on one CPU
        device only: on a GPU or TPU the kernels share one stream, so it would only hold both passes'
        activations; under a strategy the passes may hold collectives, whose launches must keep one order
        on every replica. The values are the same either way.
        """
        return self.concurrent_perturbed_passes and self.strategy is None and not accelerated()

    @property
    def shares_passes(self):
        """Whether every replica calls one trace of each pass: replica batch norm on a MirroredStrategy of several
        devices, whose replicas each trace the step in this process (a multi-worker strategy holds one
        replica per process; TPU strategies were not tried)."""
        return self.batch_norm == "replica" and ReplicaAllReduce.available(self.strategy)

    def _shared_pass(self, fn, input_signature):
        """``fn`` as one nested function that every replica calls (``NestedFunction(shared_by_replicas=True)``).

        The replica's index (for the draws it folds in, ``compiler.ops.replica_uniform``) and its copies
        of the model's non-trainable variables come in as arguments, read on the calling replica.
        """
        state = [tf.TensorSpec(v.shape, v.dtype) for v in self.model.non_trainable_variables]

        def on_replica(index, values, *args):
            with replica_index(index), self._substituted_state(values):
                return fn(*args)

        shared = NestedFunction(on_replica, [tf.TensorSpec((), tf.int32), state, *input_signature],
                                shared_by_replicas=True)

        def call(*args):
            index = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int32)
            return shared(index, self._non_trainable_values(), *args)

        return call

    def _non_trainable_values(self):
        """The model's non-trainable variables read (on the replica whose function is being traced)."""
        return [v.value for v in self.model.non_trainable_variables]

    @contextlib.contextmanager
    def _substituted_state(self, values):
        """``forward`` takes ``values`` as the model's non-trainable variables inside."""
        previous, self._state = self._state, values
        try:
            yield
        finally:
            self._state = previous

    def enter_stage(self, stage):
        """Move a supernet searched in stages (``Supernet.enter_stage``) into ``stage``, the weights' momentum
        widened with them, and rebuild the compiled passes for it."""
        optimizer = self.weights_optimizer
        self.model.enter_stage(stage, {id(v): m for v, m in zip(optimizer.variables_list, optimizer.momentum_buffers)})
        self.compile_passes()

    def compile_passes(self):
        """(Re)build the compiled passes; they trace on first use (again after the model's stage changes)."""
        model, strategy, precision = self.model, self.strategy, self.precision
        batch = self.objective.batch_signature(self.batch_size)
        weights = [tf.TensorSpec(v.shape, v.dtype) for v in self.weight_vars]
        alphas = [tf.TensorSpec(v.shape, v.dtype) for v in self.arch_vars]
        signature = [weights, alphas, batch]
        any_batch = [weights, alphas, self.objective.batch_signature()]

        def compile_pass(fn, input_signature=signature):
            # Kept as function calls (not inlined) so each body is traced and optimised once.
            # Under a strategy with global batch norm the passes hold cross-replica reductions
            # (batch statistics). On a MirroredStrategy each replica launches them itself
            # (ReplicaAllReduce, one launcher per device), so the passes stay nested, traced once
            # per replica device (tf.function keys its traces by device there). Other strategies
            # (multi-worker, TPU) keep their own all-reduce, which may go through merge_call and so
            # cannot sit in a nested function: there the passes are traced into the step itself,
            # once per call. With replica batch norm a pass holds no collective, and one trace
            # serves every replica (``shares_passes``).
            if self.passes_inlined:
                return fn
            if not self.shares_passes:
                return NestedFunction(fn, input_signature)
            return self._shared_pass(fn, input_signature)

        # Evaluation runs outside the replicas, always as its own function.
        self.loss_at = tf.function(self._loss_at, input_signature=any_batch, autograph=False)
        self.gradients_at = compile_pass(self._gradients_at)
        self.alpha_gradients_at = compile_pass(self._alpha_gradients_at)
        self.mixed_hvp_at = compile_pass(self._mixed_hvp_at, [weights, alphas, weights, batch])
        # Finite differences (the Hessian-vector product's, the eigenvalue's) take their passes in
        # float32: their perturbations are below a 16-bit type's resolution (runtime/precision.py).
        if precision == "float32":
            self.float32_alpha_gradients_at = self.alpha_gradients_at
        else:
            self.float32_alpha_gradients_at = compile_pass(self._float32_alpha_gradients_at)
        # The real weight step may add regularisers the other passes leave out.
        if self.objective.regularized:
            self.step_gradients_at = compile_pass(functools.partial(self._gradients_at, regularize=True))
        else:
            self.step_gradients_at = self.gradients_at
        if model.method.perturbs_weight_step:
            # SDARTS: passes on given op probabilities (the alpha inputs are the mixing weights).
            self.given_gradients_at = compile_pass(
                functools.partial(self._gradients_at, regularize=self.objective.regularized, mixing="given"))
            self.given_alpha_gradients_at = compile_pass(functools.partial(self._alpha_gradients_at, mixing="given"))
            self.given_train_loss_at = compile_pass(self._given_train_loss_at)
        if model.method.harmonizes_cells:
            # Lambda-DARTS: passes with one op-weight matrix per cell.
            cells = [tf.TensorSpec(model.alphas["reduce" if c.reduction else "normal"].shape,
                                   model.alphas["normal"].dtype) for c in model.cells]
            self.cell_gradients_at = compile_pass(self._cell_gradients_at, [weights, alphas, cells, batch])
        self.eval_alpha_gradients_at = (
            self.float32_alpha_gradients_at if strategy is None
            else tf.function(self._float32_alpha_gradients_at, input_signature=any_batch, autograph=False)
        )
        # Called on their own, outside the iteration: their first calls log their builds.
        self.evaluation_step = built_as_the_process_runs(self.loss_at, "evaluation step")
        # The eigenvalue's finite differences turn last-bit differences between runs into different
        # eigenvalues, which the early-stopping rule compares: built by Grappler on a CPU, the pass gave
        # the quickstart's supernet -0.70, -1.14 and -1.09 from three evaluations in one process, and
        # -1.087 each time without it. So it is built without Grappler on CPUs, as a short search's
        # steps are (with it on accelerators).
        self.eigenvalue_pass = StepFunction(self.eval_alpha_gradients_at, "eigenvalue pass")

    # -- passes on substituted values -------------------------------------------
    def forward(self, weights, alphas, **call_options):
        """The model as a function of its inputs, with ``weights`` and ``alphas`` substituted.

        ``call_options`` go to every call (``mixing="given"``: the alphas are the op weights).
        """
        values = [None] * len(self.trainable)
        for position, value in zip(self.weight_positions, weights):
            values[position] = value
        for position, value in zip(self.arch_positions, alphas):
            values[position] = value
        non_trainable = self._state if self._state is not None else self._non_trainable_values()

        def call(*args, **kwargs):
            outputs, _ = self.model.stateless_call(values, non_trainable, *args, **kwargs, **call_options)
            return outputs

        return call

    def _loss_at(self, weights, alphas, batch):
        """Loss, metric and end state on one batch, in evaluation mode."""
        _, loss, metric, state = self.objective.loss(self.forward(weights, alphas), batch, training=False)
        return loss, metric, state

    def _gradients_at(self, weights, alphas, batch, regularize=False, mixing=None):
        """Loss, metric, dL/dw, dL/da and end state at the given values."""
        options = {"mixing": mixing} if mixing else {}
        with tf.GradientTape() as tape:
            tape.watch(weights)
            tape.watch(alphas)
            value, loss, metric, state = self.objective.loss(
                self.forward(weights, alphas, **options), batch, training=True, regularize=regularize
            )
            value = self.loss_scale.scale(value)
        weight_grads, alpha_grads = tape.gradient(value, [weights, alphas])
        weight_grads, alpha_grads = (self.loss_scale.unscale(dense_gradients(weight_grads, weights)),
                                     self.loss_scale.unscale(dense_gradients(alpha_grads, alphas)))
        return loss, metric, weight_grads, alpha_grads, state

    def _alpha_gradients_at(self, weights, alphas, batch, mixing=None):
        """Loss, metric, dL/da and end state (no weight gradients are formed)."""
        options = {"mixing": mixing} if mixing else {}
        with tf.GradientTape() as tape:
            tape.watch(alphas)
            value, loss, metric, state = self.objective.loss(self.forward(weights, alphas, **options), batch,
                                                             training=True)
            value = self.loss_scale.scale(value)
        return loss, metric, self.loss_scale.unscale(dense_gradients(tape.gradient(value, alphas), alphas)), state

    def _float32_alpha_gradients_at(self, weights, alphas, batch):
        """``_alpha_gradients_at`` with the model computing in float32 whatever its policy."""
        with computing_in(self.model, "float32"):
            with tf.GradientTape() as tape:
                tape.watch(alphas)
                _, loss, metric, state = self.objective.loss(self.forward(weights, alphas), batch, training=True)
            return loss, metric, dense_gradients(tape.gradient(loss, alphas), alphas), state

    def _cell_gradients_at(self, weights, alphas, cell_weights, batch):
        """Loss, metric, dL/dW and dL/d(each cell's op weights), with ``cell_weights`` as the cells' op weights."""
        with tf.GradientTape() as tape:
            tape.watch(weights)
            tape.watch(cell_weights)
            value, loss, metric, state = self.objective.loss(
                self.forward(weights, alphas, cell_weights=cell_weights), batch, training=True,
                regularize=self.objective.regularized)
            value = self.loss_scale.scale(value)
        weight_grads, cell_grads = tape.gradient(value, [weights, cell_weights])
        return (loss, metric, self.loss_scale.unscale(dense_gradients(weight_grads, weights)),
                self.loss_scale.unscale(dense_gradients(cell_grads, cell_weights)), state)

    def harmonizing_gradients(self, weights, batch):
        """Lambda-DARTS' weight gradients: the training loss's plus its gradient-alignment regulariser.

        Returns ``(loss, metric, gradients, end state)`` at the unperturbed op weights.
        """
        model = self.model
        alphas = self.current_alphas()
        shared = {t: tf.nn.softmax(a, axis=-1) for t, a in zip(model.alphas, alphas)}  # alphas come first
        cells = [shared["reduce" if c.reduction else "normal"] for c in model.cells]
        normal = [not c.reduction for c in model.cells]
        loss, metric, gradients, cell_grads, state = self.cell_gradients_at(weights, alphas, cells, batch)
        loss, metric, gradients, cell_grads = cross_replica_mean((loss, metric, gradients, cell_grads))
        harmonized = iter(harmonizing_directions([g for g, n in zip(cell_grads, normal) if n],
                                                 model.method.options["correlation"]))
        directions = [next(harmonized) if n else tf.zeros_like(g) for g, n in zip(cell_grads, normal)]
        norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(u)) for u in directions]))
        epsilon = tf.cast(model.method.options["epsilon_0"], norm.dtype) / tf.maximum(norm, 1e-12)
        minus = self.cell_gradients_at(weights, alphas, [c - epsilon * u for c, u in zip(cells, directions)], batch)[2]
        plus = self.cell_gradients_at(weights, alphas, [c + epsilon * u for c, u in zip(cells, directions)], batch)[2]
        minus, plus = cross_replica_mean((minus, plus))
        weight = tf.cast(model.schedule["lambda_weight"], norm.dtype)
        gradients = elementwise(lambda g, m, p: g + weight * (m - p) / (2 * epsilon), gradients, minus, plus)
        return loss, metric, gradients, state

    def _given_train_loss_at(self, weights, probabilities, batch):
        """The training-mode loss with ``probabilities`` as the op weights (no gradients)."""
        return self.objective.loss(self.forward(weights, probabilities, mixing="given"), batch, training=True)[1]

    def current_weights(self):
        # Read as tensors (on a replica: its own copy), so every pass differentiates values, not variables.
        return [tf.convert_to_tensor(v.value) for v in self.weight_vars]

    def current_alphas(self):
        return [tf.convert_to_tensor(v.value) for v in self.arch_vars]

    def split_alphas(self, alphas):
        """``(op alphas, the rest)``: the alpha matrices come first; PC-DARTS' edge weights, if any, follow."""
        count = len(self.model.alphas)
        return alphas[:count], alphas[count:]

    def _pass(self, batch, number):
        return self.objective.for_pass(batch, number)

    # -- architecture gradients -------------------------------------------------
    # Each takes the current weight and alpha values, read once per iteration,
    # and returns (gradient, validation loss, validation metric, validation end state).
    def first_order_gradient(self, val, weights=None, alphas=None):
        weights = self.current_weights() if weights is None else weights
        alphas = self.current_alphas() if alphas is None else alphas
        loss, metric, gradient, state = self.alpha_gradients_at(weights, alphas, self._pass(val, PASS_VALIDATION))
        gradient, loss, metric = cross_replica_mean((gradient, loss, metric))
        return gradient, loss, metric, state

    def virtual_step(self, train, learning_rate, weights=None, alphas=None):
        """``(w', c, train pass)``: the next SGD iterate from the current weights, without the real step's clipping.

        With ``unrolled_clip`` the gradient is clipped first and ``c`` is its
        clipping coefficient; otherwise ``c`` is 1. The train pass is
        ``(loss, metric, dL/dw before clipping, end state)``.
        """
        weights = self.current_weights() if weights is None else weights
        alphas = self.current_alphas() if alphas is None else alphas
        loss, metric, gradients, _, state = self.gradients_at(weights, alphas, self._pass(train, PASS_VIRTUAL))
        loss, metric, gradients = cross_replica_mean((loss, metric, gradients))
        train_pass = (loss, metric, gradients, state)
        coefficient = tf.constant(1.0, tf.float32)
        if self.unrolled_clip is not None:
            coefficient = clip_coefficient(tf.linalg.global_norm(gradients), self.unrolled_clip)
            gradients = elementwise(lambda g: g * tf.cast(coefficient, g.dtype), gradients)
        return self.weights_optimizer.virtual_step(weights, gradients, learning_rate), coefficient, train_pass

    def virtual_weights(self, train, learning_rate, weights=None, alphas=None):
        """``w'`` alone (see ``virtual_step``)."""
        return self.virtual_step(train, learning_rate, weights, alphas)[0]

    def finite_difference_terms(self, train, val, learning_rate, weights=None, alphas=None):
        """Every quantity of the paper's formula, for the step and for inspection."""
        weights = self.current_weights() if weights is None else weights
        alphas = self.current_alphas() if alphas is None else alphas
        unrolled, coefficient, train_pass = self.virtual_step(train, learning_rate, weights, alphas)
        val_loss, val_metric, v, g1, val_state = self.gradients_at(unrolled, alphas, self._pass(val, PASS_VALIDATION))
        val_loss, val_metric, v, g1 = cross_replica_mean((val_loss, val_metric, v, g1))
        if self.unrolled_clip is not None:
            v = clip_by_global_norm(v, self.unrolled_clip)[0]
        radius = self.hvp_epsilon / tf.linalg.global_norm(v)
        step = tf.cast(radius, weights[0].dtype)
        plus = elementwise(lambda w, d: w + step * d, weights, v)
        grad_plus = cross_replica_mean(
            self.float32_alpha_gradients_at(plus, alphas, self._pass(train, PASS_PLUS))[2])
        # The two perturbed passes are independent: unless they may run at once, the second
        # waits for the first, so that only one holds its activations at a time.
        with tf.control_dependencies([] if self.perturbed_passes_concurrent else grad_plus):
            minus = elementwise(lambda w, d: w - step * d, weights, v)
        grad_minus = cross_replica_mean(
            self.float32_alpha_gradients_at(minus, alphas, self._pass(train, PASS_MINUS))[2])
        hvp = [(p - m) / tf.cast(2.0 * radius, p.dtype) for p, m in zip(grad_plus, grad_minus)]
        gradient = [g - scalar(learning_rate, g.dtype) * tf.cast(coefficient, g.dtype) * h for g, h in zip(g1, hvp)]
        return {
            "gradient": gradient,
            "g1": g1,
            "v": v,
            "hvp": hvp,
            "grad_plus": grad_plus,
            "grad_minus": grad_minus,
            "radius": radius,
            "unrolled": unrolled,
            "clip_coefficient": coefficient,
            "val_loss": val_loss,
            "val_metric": val_metric,
            "val_state": val_state,
            "train_pass": train_pass,
        }

    def exact_gradient(self, train, val, learning_rate, weights=None):
        """``d/da L_val(w'(a), a)`` exactly, with the validation loss, metric and end state (see ``exact_terms``)."""
        terms = self.exact_terms(train, val, learning_rate, weights)
        return terms["gradient"], terms["val_loss"], terms["val_metric"], terms["val_state"]

    def exact_terms(self, train, val, learning_rate, weights=None):
        """``d/da L_val(w'(a), a)``, exactly.

        With ``w'(a) = w - eta (m + c dL_train(w, a)/dw + wd w)`` the chain rule
        gives ``g1 - eta c d/da [dL_train(w, a)/dw . v]`` where ``g1`` and ``v``
        are the alpha and weight gradients of L_val at ``w'`` (``c``, the
        recurrent variant's clipping coefficient, held constant; 1 otherwise);
        the bracket is a mixed Hessian-vector product, taken by double
        back-propagation inside one traced function on the virtual step's batch
        and dropout masks (cheaper to build than differentiating through the
        calls of the other passes).
        """
        weights = self.current_weights() if weights is None else weights
        alphas = self.current_alphas()
        unrolled, coefficient, train_pass = self.virtual_step(train, learning_rate, weights, alphas)
        val_loss, val_metric, v, g1, val_state = self.gradients_at(unrolled, alphas, self._pass(val, PASS_VALIDATION))
        val_loss, val_metric, v, g1 = cross_replica_mean((val_loss, val_metric, v, g1))
        hvp = cross_replica_mean(self.mixed_hvp_at(weights, alphas, v, self._pass(train, PASS_VIRTUAL)))
        gradient = [g - scalar(learning_rate, g.dtype) * tf.cast(coefficient, g.dtype) * h for g, h in zip(g1, hvp)]
        return {"gradient": gradient, "val_loss": val_loss, "val_metric": val_metric, "val_state": val_state,
                "train_pass": train_pass}

    def _mixed_hvp_at(self, weights, alphas, vector, batch):
        """``d/da [dL(w, a)/dw . vector]`` by double back-propagation."""
        second_derivatives.install()  # TensorFlow's own second derivative of max pooling can be wrong
        with tf.GradientTape() as outer:
            outer.watch(alphas)
            with tf.GradientTape() as inner:
                inner.watch(weights)
                value = self.loss_scale.scale(self.objective.loss(self.forward(weights, alphas), batch,
                                                                  training=True)[0])
            weight_grads = dense_gradients(inner.gradient(value, weights), weights)
            dot = tf.add_n([tf.reduce_sum(g * d) for g, d in zip(weight_grads, vector)])
        # The scale enters once, through the inner gradient.
        return self.loss_scale.unscale(dense_gradients(outer.gradient(dot, alphas), alphas))

    def arch_gradient(self, order, mode, train, val, learning_rate, weights=None):
        """``(gradient, validation loss, validation metric, validation end state)``."""
        return self._arch_gradient(order, mode, train, val, learning_rate, weights)[:4]

    def _arch_gradient(self, order, mode, train, val, learning_rate, weights=None):
        # The four of ``arch_gradient`` and the virtual step's train pass (None in first order).
        weights = self.current_weights() if weights is None else weights
        if order == "first":
            return (*self.first_order_gradient(val, weights), None)
        if mode == "exact":
            terms = self.exact_terms(train, val, learning_rate, weights)
        else:
            terms = self.finite_difference_terms(train, val, learning_rate, weights)
        return terms["gradient"], terms["val_loss"], terms["val_metric"], terms["val_state"], terms["train_pass"]

    def alpha_loss_gradient(self, alphas=None):
        """``(loss, d loss/da)`` of the search method's extra alpha loss at the schedule's current values.

        ``None`` for a method without one (DARTS).
        """
        alphas = self.current_alphas() if alphas is None else alphas
        # The loss is the op alphas'; PC-DARTS' edge weights get a zero gradient from it.
        ops_alphas, others = self.split_alphas(alphas)
        schedule = {name: tf.convert_to_tensor(v.value) for name, v in self.model.schedule.items()}
        with tf.GradientTape() as tape:
            tape.watch(ops_alphas)
            loss = self.model.method.alpha_loss(ops_alphas, schedule)
        if loss is None:
            return None
        return loss, dense_gradients(tape.gradient(loss, ops_alphas), ops_alphas) + [tf.zeros_like(b) for b in others]

    # -- steps ------------------------------------------------------------------
    def weight_step(self, train, learning_rate, weights=None):
        """One real SGD step; returns (loss, metric, gradient norm, end state).

        Under a method that perturbs the weight step (SDARTS), the step's
        gradients are taken with ``perturbed_probabilities`` as the op weights.
        """
        weights = self.current_weights() if weights is None else weights
        batch = self._pass(train, PASS_WEIGHTS)
        if self.model.method.harmonizes_cells:
            loss, metric, gradients, state = self.harmonizing_gradients(weights, batch)  # averaged already
            return self._apply_weight_gradients((loss, metric, gradients, state), learning_rate)
        if self.model.method.perturbs_weight_step:
            loss, metric, gradients, _, state = self.given_gradients_at(
                weights, self.perturbed_probabilities(weights, batch), batch)
        else:
            loss, metric, gradients, _, state = self.step_gradients_at(weights, self.current_alphas(), batch)
        loss, metric, gradients = cross_replica_mean((loss, metric, gradients))
        return self._apply_weight_gradients((loss, metric, gradients, state), learning_rate)

    def perturbed_probabilities(self, weights, batch):
        """SDARTS' op probabilities for the weight step: ``softmax(alpha)`` perturbed within epsilon.

        ``rs``: a uniform draw in [-epsilon, epsilon] per entry; ``adv``: PGD on
        the training loss of ``batch`` from a random start, projected into the
        epsilon box after each step, kept only if it raised the loss; each
        clipped to the simplex (``clip_to_simplex``). The draws are the step's
        (``draw``). PC-DARTS' edge weights, if any, follow the probabilities unperturbed.
        """
        method = self.model.method
        ops_alphas, edges = self.split_alphas(self.current_alphas())
        clean = [tf.nn.softmax(a, axis=-1) for a in ops_alphas]
        epsilon = tf.cast(self.model.schedule["epsilon"], clean[0].dtype)

        def uniform(index, shape):
            seed = self.model.noise_seed + tf.constant([0, 7919], tf.int32) * (index + 1)
            return tf.random.stateless_uniform(shape, seed, minval=-1.0, maxval=1.0, dtype=clean[0].dtype) * epsilon

        started = [clip_to_simplex(p + uniform(i, tf.shape(p))) for i, p in enumerate(clean)]
        if method.options["perturbation"] == "rs":
            return started + edges
        steps = method.options["pgd_steps"]
        size = 2.0 * epsilon / steps
        before = cross_replica_mean(self.given_train_loss_at(weights, clean + edges, batch))
        attacked = started
        for _ in range(steps):
            gradients = cross_replica_mean(self.given_alpha_gradients_at(weights, attacked + edges, batch)[2])
            attacked = [clip_to_simplex(p + tf.clip_by_value(a + size * tf.sign(g) - p, -epsilon, epsilon))
                        for p, a, g in zip(clean, attacked, gradients)]
        after = cross_replica_mean(self.given_train_loss_at(weights, attacked + edges, batch))
        return [tf.where(before > after, p, a) for p, a in zip(clean, attacked)] + edges

    def _apply_weight_gradients(self, train_pass, learning_rate):
        """SGD on the weights with a train pass's (replica-averaged) gradients; (loss, metric, norm, state)."""
        loss, metric, gradients, state = train_pass
        return loss, metric, self.loss_scale.apply(self.weights_optimizer, gradients, learning_rate), state

    def draw(self, phase):
        """Give a stochastic method's passes the draws of this iteration's ``phase`` (0: alpha step, 1: weights).

        The draws follow from the weight optimiser's step count and the
        phase, so each step and phase has its own, the passes of one step
        (unrolled ones included) share them, and a resumed search draws the same.
        """
        if getattr(self.model, "noise_seed", None) is not None:
            self.model.set_noise(tf.cast(self.weights_optimizer.iterations, tf.int32) * 2 + phase)

    def iteration(self, order, mode, train, val, weights_lr, arch_lr):
        """Alpha step then weight step on the same train batch.

        Returns ``(metrics, train end state, validation end state)``. A
        single-level method (SNAS) takes one step instead (``single_level_iteration``).
        """
        if self.model.method.single_level:
            return self.single_level_iteration(train, weights_lr, arch_lr)
        self.draw(0)
        weights = self.current_weights()  # unchanged by the alpha step: read once
        arch_grad, val_loss, val_metric, val_state, train_pass = self._arch_gradient(
            order, mode, train, val, weights_lr, weights)
        arch_grad, expected_latency = self.with_latency(arch_grad, val_loss)
        extra = self.alpha_loss_gradient()
        if extra is not None:
            arch_grad = [g + e for g, e in zip(arch_grad, extra[1])]
        arch_grad_norm = self.loss_scale.apply(self.arch_optimizer, arch_grad, arch_lr)
        self.draw(1)
        if self.reuse_virtual_gradient and train_pass is not None:
            train_loss, train_metric, grad_norm, train_state = self._apply_weight_gradients(train_pass, weights_lr)
        else:
            # The weight step reads the alphas after their update (automatic control dependencies).
            train_loss, train_metric, grad_norm, train_state = self.weight_step(train, weights_lr, weights)
        metric = self.objective.metric_name
        metrics = {
            "train_loss": train_loss,
            f"train_{metric}": train_metric,
            "arch_loss": val_loss,
            f"arch_{metric}": val_metric,
            "grad_norm": grad_norm,
            "arch_grad_norm": arch_grad_norm,
        }
        if extra is not None:
            metrics["alpha_loss"] = extra[0]
        if expected_latency is not None:
            metrics["expected_latency_ms"] = expected_latency
        return metrics, train_state, val_state

    def with_latency(self, arch_grad, task_loss):
        """``(gradient, expected latency)``: the latency objective's alpha gradient, or ``(arch_grad, None)``."""
        if self.latency is None:
            return arch_grad, None
        return self.latency.apply(arch_grad, task_loss, self.current_alphas())

    def single_level_iteration(self, train, weights_lr, arch_lr):
        """Weights and alphas each take a step down the same training loss, from one pass (SNAS).

        The alpha step adds the method's extra alpha loss. The validation batch
        is not used; ``arch_loss`` reports the training loss the alphas descended.
        """
        self.draw(1)
        loss, metric, weight_grads, arch_grads, state = self.step_gradients_at(
            self.current_weights(), self.current_alphas(), self._pass(train, PASS_WEIGHTS))
        loss, metric, weight_grads, arch_grads = cross_replica_mean((loss, metric, weight_grads, arch_grads))
        arch_grads, expected_latency = self.with_latency(arch_grads, loss)
        extra = self.alpha_loss_gradient()
        if extra is not None:
            arch_grads = [g + e for g, e in zip(arch_grads, extra[1])]
        arch_grad_norm = self.loss_scale.apply(self.arch_optimizer, arch_grads, arch_lr)
        grad_norm = self.loss_scale.apply(self.weights_optimizer, weight_grads, weights_lr)
        metric_name = self.objective.metric_name
        metrics = {"train_loss": loss, f"train_{metric_name}": metric, "arch_loss": loss,
                   f"arch_{metric_name}": metric, "grad_norm": grad_norm, "arch_grad_norm": arch_grad_norm}
        if extra is not None:
            metrics["alpha_loss"] = extra[0]
        if expected_latency is not None:
            metrics["expected_latency_ms"] = expected_latency
        return metrics, state, state

    def weights_only_iteration(self, train, val, weights_lr, arch_lr):
        """The weight step alone, the alphas left as they are (a method's warm-up, PC-DARTS').

        Returns what ``iteration`` does, without the architecture step's values.
        """
        self.draw(1)
        loss, metric, grad_norm, state = self.weight_step(train, weights_lr)
        return ({"train_loss": loss, f"train_{self.objective.metric_name}": metric, "grad_norm": grad_norm},
                state, state)

    def compiled_weight_step(self, grappler=None):
        """``weights_only_iteration`` compiled as ``compiled_iteration`` compiles the whole iteration."""
        return self._step_function(self.weights_only_iteration, "warm-up step", grappler)

    def compiled_iteration(self, order, mode, grappler=None):
        """The whole iteration as one ``tf.function``, traced once (batch and sequence sizes left open).

        ``step(train, val, weights_lr, arch_lr)`` with batches as tuples, a
        ``StepFunction`` (``grappler``: see there; by default the Bilevel's).
        """
        return self._step_function(functools.partial(self.iteration, order, mode), "search step", grappler)

    def _step_function(self, iteration, name, grappler):
        """``iteration`` compiled, as a ``StepFunction`` with ``grappler`` or else the Bilevel's setting."""
        return StepFunction(self._compile(iteration), name, self.grappler if grappler is None else grappler)

    def _compile(self, iteration):
        """``iteration(train, val, weights_lr, arch_lr)`` as one ``tf.function``, on the replicas under a strategy."""
        batch = self.objective.batch_signature(None if self.batch_size is None else self.batch_size * self.replicas)
        scalar_spec = tf.TensorSpec((), tf.float32)
        strategy = self.strategy

        if strategy is None:
            @tf.function(input_signature=[batch, batch, scalar_spec, scalar_spec], autograph=False)
            def step(train, val, weights_lr, arch_lr):
                return iteration(train, val, weights_lr, arch_lr)

            return step

        split = self.objective.per_example

        @tf.function(input_signature=[batch, batch, scalar_spec, scalar_spec], autograph=False)
        def distributed_step(train, val, weights_lr, arch_lr):
            # Each replica takes its slice of the global batches; metrics are averaged
            # already, and the carried states are gathered back into global ones.
            with replica_batch_statistics(self.batch_norm == "replica"), replica_all_reduce(self.all_reduce):
                metrics, train_state, val_state = strategy.run(
                    iteration,
                    args=(replica_slices(strategy, train, split), replica_slices(strategy, val, split), weights_lr,
                          arch_lr),
                )
            metrics = {k: strategy.experimental_local_results(v)[0] for k, v in metrics.items()}
            gather = lambda state: strategy.gather(state, axis=0)  # noqa: E731
            return metrics, tf.nest.map_structure(gather, train_state), tf.nest.map_structure(gather, val_state)

        return distributed_step

    def alpha_hessian_product(self, batch, radius=1e-3):
        """``product(v)``: the Hessian of the loss on ``batch`` with respect to the alphas times ``v`` (all alphas
        as one float64 vector), at the current weights and alphas.

        The central difference of two alpha gradients from the already
        compiled gradient pass, ``(g(a + r v) - g(a - r v)) / 2r``; ``v`` of
        unit length, ``r`` is ``radius``.
        """
        weights = self.current_weights()
        alphas = [a.numpy().astype("float64") for a in self.arch_vars]
        sizes = [a.size for a in alphas]
        data = self._pass(batch, PASS_VALIDATION)

        def product(vector):
            pieces = np.split(vector, np.cumsum(sizes)[:-1])
            gradients = [
                self.eigenvalue_pass(weights, [tf.constant(a + sign * radius * v.reshape(a.shape), dt.dtype)
                                               for a, v, dt in zip(alphas, pieces, self.arch_vars)], data)[2]
                for sign in (1, -1)]
            return np.concatenate([(p.numpy().astype("float64") - m.numpy().astype("float64")).ravel()
                                   for p, m in zip(*gradients)]) / (2 * radius)

        return product

    def alpha_hessian_eigenvalue(self, batch, iterations=5, radius=1e-3, seed=0):
        """The dominant eigenvalue of the Hessian of the loss on ``batch`` with respect to the alphas.

        ``dominant_ritz_value`` (Lanczos) from ``iterations`` products of
        ``alpha_hessian_product``, from a random start drawn with ``seed``:
        the eigenvalue of largest magnitude, with its sign. Evaluated at the
        current weights.
        """
        rng = np.random.default_rng(seed)
        start = np.concatenate([rng.normal(size=tuple(a.shape)).ravel() for a in self.arch_vars])
        return dominant_ritz_value(self.alpha_hessian_product(batch, radius), start, iterations)

    def evaluate_batch(self, batch):
        """``(summed loss, summed metric, count, end state)`` of one batch in evaluation mode."""
        loss, metric, state = self.evaluation_step(self.current_weights(), self.current_alphas(), batch)
        count = self.objective.count(batch)
        return loss * count, metric * count, count, state
