"""``CellKind``: everything the runtime asks of a search-space kind.

The runtime never asks which kind it has; it asks the kind (``kind_of(spec)``)
at these points:

==========================  ===================================================
question                    method or attribute
==========================  ===================================================
spec layout                 ``spec_layout`` (the built-in kind whose schema and
                            typed spec a spec of this kind uses)
the data and its record     ``check_data`` (without loading it), ``load_data``,
                            ``data_document``, ``data_files``
the search                  ``search_context`` (what is prepared first),
                            ``search_task`` (batches, objective, evaluation,
                            derivation), ``build_search`` and
                            ``estimate_context`` (for ``keras-darts estimate``),
                            ``synthetic_batch``, ``activation_bytes``
random cells                ``cell_types`` with ``alpha_edges``
collapse statistic          ``collapse(derived)``: skip connections and
                            parameter-free ops of ``collapse_cell``
retraining and its result   ``check_retrainable``, ``retrain``,
                            ``retrain_result``, ``retrain_summary``, ``metric``
export                      ``export``
pictures and text           ``cell_inputs``, ``first_node``, ``output_label``, ``output_rule``,
                            ``alpha_edges``, ``describe_space``,
                            ``describe_derived``
==========================  ===================================================

A kind module may import the rest of the runtime; the runtime reaches kinds
only through the registry in ``keras_darts.runtime.kinds``.
"""

import abc


class CellKind(abc.ABC):
    name = None
    spec_layout = None
    metric = "accuracy"
    metric_format = "{:.4f}"
    higher_is_better = True  # of ``metric``
    # The cell types of a derived spec of this kind (``keras-darts compare`` draws random cells of each).
    cell_types = ()
    # Whether retraining runs under the search's tf.distribute strategy (else on one device).
    distributed_retraining = True
    # Pictures: labels of the cell's input nodes, the number of its first
    # intermediate node, and what the output node does.
    cell_inputs = {}
    first_node = 2
    output_label = "output"
    output_rule = "concat"  # what the output does with its nodes, for ``keras-darts show``
    # Collapse: the cell type whose derived cell is counted, and which ops count.
    collapse_cell = None
    skip_operation = None
    parameter_free = ()

    # -- data ---------------------------------------------------------------------
    data_checks = {}  # data.source -> checks of runtime.data_checks

    def check_data(self, spec, light=False):
        """Check what can be checked of ``spec.data`` without reading it; ``light``: nor importing TensorFlow."""
        from ..data_checks import check_data_source

        check_data_source(spec, self.data_checks, light=light)

    @abc.abstractmethod
    def load_data(self, spec):
        """The data ``spec.data`` names, checked against the spec; ``DataError`` naming the field otherwise."""

    @abc.abstractmethod
    def data_document(self, spec, data):
        """What ``data.json`` records of the data (for retraining and export from the run directory)."""

    def data_files(self, spec, data):
        """Further text files of the run directory, ``{name: text}``."""
        return {}

    # -- search -------------------------------------------------------------------
    def search_context(self, spec, run_dir=None):
        """Keyword arguments ``search_task`` takes beyond the spec, prepared before it (a latency table)."""
        return {}

    @abc.abstractmethod
    def search_task(self, spec, data, strategy=None, **context):
        """The search task: batches, bilevel iteration, evaluation, derivation (see ``SearchDriver``)."""

    def estimate_context(self, spec):
        """Keyword arguments ``build_search`` needs beyond the spec (such as a vocabulary size)."""
        return {}

    @abc.abstractmethod
    def build_search(self, spec, strategy=None, **context):
        """The ``Bilevel`` a search of ``spec`` runs, built as the search builds it."""

    @abc.abstractmethod
    def synthetic_batch(self, spec, bilevel, seed=0):
        """A random batch of the search's shape (for measuring an iteration without data)."""

    @abc.abstractmethod
    def activation_bytes(self, spec, bilevel):
        """Floating-point bytes one forward pass of the supernet produces at the spec's batch size."""

    def collapse(self, derived):
        """Skip connections and parameter-free ops in the derived ``collapse_cell``."""
        ops = [edge.op for node in derived.cells[self.collapse_cell].nodes for edge in node]
        return {
            "skip_connections": sum(op == self.skip_operation for op in ops),
            "parameter_free": sum(op in self.parameter_free for op in ops),
        }

    @abc.abstractmethod
    def alpha_edges(self, nodes):
        """The ``(source, target)`` edge of each alpha row of a cell with ``nodes`` intermediate nodes."""

    # -- retraining and export -----------------------------------------------------
    def check_retrainable(self, spec, derived):
        """Raise ``SpecError`` unless ``spec`` can retrain ``derived`` (by default: the same kind)."""
        from keras_darts.spec import SpecError

        if derived.kind != spec.search_space.kind:
            raise SpecError.single(derived.source, "$.kind", f"a derived spec of kind '{derived.kind}' cannot be "
                                   f"retrained by a '{spec.search_space.kind}' spec")

    @abc.abstractmethod
    def retrain(self, spec, derived, data, run_dir=None, progress=False, strategy=None, writes=True):
        """Train ``derived`` from scratch as ``spec.retrain`` says; a result with the model and test figures."""

    @abc.abstractmethod
    def retrain_result(self, run_dir, model, metrics, history):
        """The result of a finished retraining, from its files."""

    @abc.abstractmethod
    def retrain_summary(self, result):
        """One line: the retrained model's size and test figure."""

    @abc.abstractmethod
    def export(self, run_dir, info, model=None, data=None, config=None):
        """Export the retrained model in ``config.formats`` (an ``ExportConfig``) under ``run_dir/export``.

        Each file is verified in a fresh process; returns the report written
        to ``export/report.json`` (``deploy.report``).
        """

    # -- text -----------------------------------------------------------------------
    @abc.abstractmethod
    def describe_space(self, spec):
        """One line for ``keras-darts validate``."""

    @abc.abstractmethod
    def describe_derived(self, derived):
        """Lines for ``keras-darts show`` after the cells."""
