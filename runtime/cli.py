"""Command line: ``compile-and-search`` and ``keras-darts <step>``.

Exit codes: 0 success; 2 bad input (a spec, data or run directory that
cannot be used); 3 a diverged search; 1 any other failure (an export that
fails its verification included); 130 interrupted. Every error of the
project's own prints as one line per problem, ``<file>: <field>: <message>``,
without a traceback.
"""

import argparse
import logging
import os
import shutil
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_darts.spec import EXPORT_FORMATS, KerasDartsError, RunDirectoryError  # noqa: E402
from keras_darts.spec.model import combined_methods  # noqa: E402

EXIT_OK, EXIT_FAILURE, EXIT_INTERRUPTED = 0, 1, 130


def _spec_arguments(parser):
    parser.add_argument("spec", help="search-space spec (YAML)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override a spec value, e.g. --set search.epochs=10 (repeatable)",
    )


def _distribute_argument(parser):
    parser.add_argument("--distribute", choices=["none", "mirrored", "multi_worker", "tpu"],
                        help="run data-parallel on this strategy (overrides distribute.strategy in the spec)")


def _run_arguments(parser):
    _distribute_argument(parser)
    parser.add_argument("--run-dir", help="where the run's artifacts go (default: runs/<spec name>)")
    parser.add_argument("--overwrite", action="store_true", help="empty an existing run directory first")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _load(args):
    from keras_darts.spec import load_spec

    return load_spec(args.spec, overrides=list(args.overrides) + _distribute_override(args))


def _distribute_override(args):
    """``--distribute`` as a spec override (none when the flag is absent)."""
    return [f"distribute.strategy={args.distribute}"] if getattr(args, "distribute", None) else []


def _run_dir(args, spec):
    from keras_darts.runtime.rundir import default_run_dir

    return args.run_dir or default_run_dir(spec)


def _tensorflow():
    """Start TensorFlow without its start-up notices, and without what Keras imports for nothing here
    (see ``runtime.startup``)."""
    from keras_darts.runtime.startup import import_tensorflow_quietly

    import_tensorflow_quietly(without_keras_extras=True)


def _print_report(report):
    from keras_darts.runtime.workflow import summary_lines

    for line in summary_lines(report):
        print(line)


def cmd_compile_and_search(args):
    spec = _load(args)
    from keras_darts.runtime.kinds import kind_of

    kind_of(spec).check_data(spec, light=True)  # before TensorFlow loads
    if spec.retrain.enabled and spec.export.enabled and not args.search_only:
        from keras_darts.runtime.deploy import check_requirements

        check_requirements(spec.export.formats, spec.source)  # before the search, not after it
    _tensorflow()
    from keras_darts.runtime.workflow import run_compile_and_search

    print(f"spec {spec.source}: valid ({spec.name}, {len(spec.search_space.operations)} ops, "
          f"{spec.search_space.nodes} nodes, k={spec.search_space.k}, {spec.search.order} order)")
    report = run_compile_and_search(
        spec, _run_dir(args, spec), overwrite=args.overwrite, search_only=args.search_only,
        progress=not args.no_progress,
    )
    _print_report(report)
    return EXIT_OK


def cmd_validate(args):
    spec = _load(args)
    from keras_darts.runtime.kinds import kind_of

    kind_of(spec).check_data(spec)
    space = spec.search_space
    print(f"{spec.source}: valid")
    print(f"  name: {spec.name}")
    print(f"  operations: {', '.join(space.operations)}")
    print(f"  {kind_of(spec).describe_space(spec)}")
    method = spec.search.method
    combined = combined_methods(spec)
    if "pc_darts" in combined:
        method += f" on PC-DARTS' supernet (K = {spec.search.pc_darts.partial_channels})"
    if "darts_pt" in combined:
        method += ", then DARTS-PT's selection"
    if spec.search.method == "drnas" and spec.search.drnas.progressive:
        o = spec.search.drnas
        method += (f", progressive: {len(o.stage_partial_channels)} stages on C/"
                   f"{', C/'.join(map(str, o.stage_partial_channels))} channels, each edge pruned to "
                   f"{', then '.join(map(str, o.stage_keep_ops))} ops between them")
    print(f"  search: {spec.search.epochs} epochs, {spec.search.order} order, method {method}; "
          f"data: {spec.data.source}")
    return EXIT_OK


def cmd_search(args):
    args.search_only = True
    return cmd_compile_and_search(args)


def cmd_retrain(args):
    _tensorflow()
    from keras_darts.runtime.determinism import configure_kernel_threads
    from keras_darts.runtime.distribution import check_batch, is_chief, make_strategy
    from keras_darts.runtime.kinds import kind_of
    from keras_darts.runtime.workflow import check_retrainable, export_run, load_data, load_run_spec, retrain_run
    from keras_darts.spec import load_derived

    spec = load_run_spec(args.run_dir, _distribute_override(args))
    configure_kernel_threads(spec)  # before TensorFlow starts its runtime
    strategy = make_strategy(spec.distribute, spec.source)
    derived = load_derived(args.derived or os.path.join(args.run_dir, "derived.yaml"))
    check_retrainable(spec, derived)  # before anything in the run directory is touched
    check_batch(spec, strategy)
    chief = strategy is None or is_chief(strategy)  # only the chief touches the run directory
    retrain_dir = os.path.join(args.run_dir, "retrain")
    if chief and os.path.exists(retrain_dir) and not args.overwrite:
        raise RunDirectoryError.single(args.run_dir, "retrain/", "exists already; pass --overwrite to replace it")
    data = load_data(spec)
    if chief and os.path.exists(retrain_dir):
        shutil.rmtree(retrain_dir)
    result = retrain_run(spec, derived, data, args.run_dir, progress=not args.no_progress, strategy=strategy,
                         writes=chief)
    if not chief:
        return EXIT_OK
    print(kind_of(spec).retrain_summary(result))
    print(f"retrained model:  {os.path.join(args.run_dir, 'retrain', 'model.keras')}")
    if spec.export.enabled:
        _print_export(export_run(args.run_dir, model=result.model, data=data), args.run_dir)
    return EXIT_OK


def _print_export(document, run_dir):
    from keras_darts.runtime.deploy import REPORT, report_lines

    for line in report_lines(document):
        print(line)
    print(f"export report: {os.path.join(run_dir, 'export', REPORT)}")


def cmd_export(args):
    _tensorflow()
    from keras_darts.runtime.workflow import export_run

    _print_export(export_run(args.run_dir, formats=args.formats), args.run_dir)
    return EXIT_OK


def cmd_estimate(args):
    from keras_darts.runtime.estimate import estimate, report_lines

    spec = _load(args)
    _tensorflow()
    print(f"estimate for {spec.name} ({spec.source}), measured on this machine:")
    for line in report_lines(estimate(spec, steps=args.steps, orders=args.orders)):
        print(f"  {line}")
    return EXIT_OK


def cmd_latency_table(args):
    from keras_darts.runtime.latency import plan_for, write_table_file

    spec = _load(args)
    _tensorflow()
    path = write_table_file(spec, args.output)
    print(f"latency table of {spec.name}'s {spec.search.latency.network} network: {len(plan_for(spec).blocks)} "
          f"blocks, in milliseconds, written to {path}")
    return EXIT_OK


def cmd_plot(args):
    _tensorflow()
    from keras_darts.runtime.workflow import plot_run

    print(f"pictures: {plot_run(args.run_dir)}")
    return EXIT_OK


def cmd_compare(args):
    spec = _load(args)
    from keras_darts.runtime.kinds import kind_of

    kind = kind_of(spec)
    kind.check_data(spec, light=True)
    if args.seeds < 1 or args.random < 0:
        from keras_darts.spec import SpecError

        raise SpecError.single(spec.source, "--seeds" if args.seeds < 1 else "--random",
                               "must be at least 1" if args.seeds < 1 else "must be 0 or more")
    _tensorflow()
    from keras_darts.runtime.determinism import configure_kernel_threads, op_determinism

    configure_kernel_threads(spec)  # before TensorFlow starts its runtime
    from keras_darts.runtime import compare as comparison
    from keras_darts.runtime.rundir import default_run_dir

    candidates = comparison.named_candidates(args.runs, args.derived)
    candidates += comparison.random_candidates(spec, args.random, args.random_seed)
    comparison.check_candidates(spec, comparison.unique_names(candidates))
    out = args.out or default_run_dir(spec) + "-compare"
    seeds = comparison.seeds_of(spec, args.seeds)
    if spec.distribute.strategy != "none":
        print(f"note: compare retrains on one device; distribute.strategy {spec.distribute.strategy} is not used")
    print(f"compare: {len(candidates)} architectures x {len(seeds)} seeds {seeds}, retrained as {spec.source}'s "
          f"retrain block says ({spec.retrain.epochs} epochs), into {out}")
    with op_determinism(spec.search.deterministic):
        document = comparison.compare(spec, candidates, seeds, out, overwrite=args.overwrite,
                                      progress=not args.no_progress)
    rows = comparison.summary_rows(kind, document)
    for line in comparison.table_lines(kind, rows):
        print(line)
    for line in comparison.comparison_lines(kind, rows):
        print(line)
    print(f"table: {os.path.join(out, 'results.md')} and results.csv; plot: "
          f"{os.path.join(out, 'metric_vs_parameters.png')}")
    failed = [(row["candidate"], seed) for row in rows for seed in row["failed_seeds"]]
    if failed:
        print("failed (see error.txt in each seed's folder; the same command retries them): "
              + ", ".join(f"{name} seed {seed}" for name, seed in failed), file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_show(args):
    from keras_darts.spec import load_derived

    run_dir = args.derived if os.path.isdir(args.derived) else None
    if run_dir:
        from keras_darts.runtime.rundir import require_run

        require_run(run_dir, "derived.yaml")
    derived = load_derived(os.path.join(run_dir, "derived.yaml") if run_dir else args.derived)
    _tensorflow()
    from keras_darts.runtime.kinds import kind_of

    kind = kind_of(derived)
    print(f"{derived.name} ({derived.source})")
    for cell_type, cell in derived.cells.items():
        print(f"  {cell_type}:")
        for n, node in enumerate(cell.nodes):
            print(f"    node {n + kind.first_node}: " + ", ".join(f"{e.op} <- {e.input}" for e in node))
        print(f"    output: {kind.output_rule} {list(cell.concat)}")
    for line in kind.describe_derived(derived):
        print(f"  {line}")
    report = os.path.join(run_dir, "export", "report.json") if run_dir else None
    if report and os.path.exists(report):
        from keras_darts.runtime.deploy import report_lines
        from keras_darts.runtime.rundir import read_json

        print(f"  export ({report}):")
        for line in report_lines(read_json(report))[1:]:  # the network's figures are above
            print(f"    {line}")
    return EXIT_OK


def _parser(prog, compile_only=False):
    if compile_only:
        parser = argparse.ArgumentParser(
            prog=prog, description="Validate a DARTS search-space spec, compile it, search, derive, retrain and export."
        )
        _spec_arguments(parser)
        _run_arguments(parser)
        parser.add_argument("--search-only", action="store_true", help="stop after search and derivation")
        parser.set_defaults(handler=cmd_compile_and_search)
        return parser
    parser = argparse.ArgumentParser(prog=prog, description="keras-darts: the steps of a DARTS run one by one.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("validate", help="check a spec and print what it describes")
    _spec_arguments(p)
    p.set_defaults(handler=cmd_validate)
    p = commands.add_parser("search", help="search and derive (no retraining)")
    _spec_arguments(p)
    _run_arguments(p)
    p.set_defaults(handler=cmd_search)
    p = commands.add_parser("retrain", help="retrain a run's derived spec (or another) and export it")
    p.add_argument("run_dir", help="a run directory made by search or compile-and-search")
    p.add_argument("--derived", help="a derived spec file or published name (default: the run's derived.yaml)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing retrain/")
    _distribute_argument(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=cmd_retrain)
    p = commands.add_parser("export", help="export a run's retrained model (SavedModel, TFLite), verified and timed")
    p.add_argument("run_dir")
    p.add_argument("--format", dest="formats", action="append", choices=list(EXPORT_FORMATS),
                   help="a format to write (repeatable; default: the spec's export.formats)")
    p.set_defaults(handler=cmd_export)
    p = commands.add_parser("estimate", help="parameters, activation memory, peak memory and time per iteration")
    _spec_arguments(p)
    p.add_argument("--steps", type=int, default=3, help="timed iterations per order (after one untimed)")
    p.add_argument("--orders", nargs="+", default=["first", "second"], choices=["first", "second"])
    p.set_defaults(handler=cmd_estimate)
    p = commands.add_parser("latency-table", help="measure every block a latency-aware search of a spec looks "
                                                  "up, through the TFLite interpreter on this machine")
    _spec_arguments(p)
    p.add_argument("--output", default="latency_table.yaml",
                   help="where the table goes (YAML, {block key: ms}; search.latency.table reads it)")
    p.set_defaults(handler=cmd_latency_table)
    p = commands.add_parser("plot", help="draw a run's derived cells, alpha heatmaps and diagnostics")
    p.add_argument("run_dir")
    p.set_defaults(handler=cmd_plot)
    p = commands.add_parser("compare", help="retrain searched, published and random architectures of a spec's "
                                            "space under its retrain block, with several seeds, and tabulate them")
    _spec_arguments(p)
    p.add_argument("--run", dest="runs", action="append", default=[], metavar="RUN_DIR",
                   help="a run directory whose derived.yaml competes (repeatable)")
    p.add_argument("--derived", action="append", default=[], metavar="FILE_OR_NAME",
                   help="a derived spec file or published architecture (DARTS_V1, DARTS_V2, ...) (repeatable)")
    p.add_argument("--random", type=int, default=0, metavar="N",
                   help="N cells drawn uniformly at random from the spec's space (DARTS' k-edges-per-node rule)")
    p.add_argument("--random-seed", type=int, default=0, help="the seed the random cells are drawn from")
    p.add_argument("--seeds", type=int, default=3, help="retrainings per architecture, with seeds retrain.seed, "
                                                         "retrain.seed+1, ... (default 3)")
    p.add_argument("--out", help="where the comparison goes (default: runs/<spec name>-compare); "
                                 "the same command resumes it")
    p.add_argument("--overwrite", action="store_true", help="empty an earlier comparison's folder first")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_compare)
    p = commands.add_parser("show", help="print a derived spec's cells, parameters and multiply-adds "
                                         "(and a run's exported files, their accuracy, size and latency)")
    p.add_argument("derived", help="a derived spec file, a published name (DARTS_V1, DARTS_V2) or a run directory")
    p.set_defaults(handler=cmd_show)
    return parser


def _run(parser, argv):
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("tensorflow", "absl", "h5py"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.handler(args)
    except KerasDartsError as exc:  # the project's own report, one line per problem: no traceback
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if os.environ.get("KERAS_DARTS_DEBUG"):
            raise
        print(f"error: {type(exc).__name__}: {exc}\n(set KERAS_DARTS_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


def compile_and_search_main(argv=None):
    return _run(_parser("compile-and-search", compile_only=True), argv)


def main(argv=None):
    return _run(_parser("keras-darts"), argv)


if __name__ == "__main__":
    sys.exit(main())
