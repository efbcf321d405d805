"""The `dkd-tune` command: parses arguments, validates them, and calls one function per subcommand.

Heavy libraries (torch, Ray, MLflow) are imported inside the commands that need them, so
`dkd-tune --help` is instant and a bad argument is refused before anything is started.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dkd_tune import __version__
from dkd_tune.core.errors import UserInputError
from dkd_tune.core.losses import LOSS_MODE_NAMES, LOSS_MODES
from dkd_tune.search.interruption import SearchInterrupted


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="dkd-tune")
def cli() -> None:
    """Hyperparameter search for Decoupled Knowledge Distillation (DKD).

    Searches beta, alpha, temperature and warm-up for a teacher/student pair with Optuna (TPE)
    and ASHA on Ray Tune, predicts beta from the teacher's logit gap, and logs everything to MLflow.
    """


@cli.command("calibrate")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="Calibration file to write (JSON)."
)
@click.option("--family", help="Dataset family the results must be of (default: the one in the files).")
@click.option("--name", help="Calibration name (default: the output file's stem).")
def calibrate(results: tuple[str, ...], out: str, family: str | None, name: str | None) -> None:
    """Fit an auto-beta calibration (teacher gap -> beta) from finished searches' results Parquet."""
    from analysis.best_beta import calibrate_from_results

    calibration, warnings = calibrate_from_results(results, out, family=family, name=name)
    click.echo(calibration.report())
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"wrote {out}")


@cli.command("show-calibration")
@click.argument("calibration_file", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--family", help="Dataset family: the shipped default to show, or the one the file must be for."
)
@click.option(
    "--gap", "gaps", type=float, multiple=True, help="Teacher gap to predict beta for (repeatable)."
)
def show_calibration(calibration_file: str | None, family: str | None, gaps: tuple[float, ...]) -> None:
    """Show an auto-beta calibration (default: the shipped CIFAR one) and its beta for given gaps."""
    from dkd_tune.teacher.auto_beta import describe_calibration

    click.echo(describe_calibration(calibration_file, family, gaps))


@cli.command("suggest-beta")
@click.option("--teacher-model", required=True, help="Teacher architecture, e.g. wrn_40_2.")
@click.option(
    "--teacher-checkpoint",
    required=True,
    type=click.Path(dir_okay=False),
    help="Teacher weights (dkd-tune, mdistiller/CRD or a bare state dict).",
)
@click.option("--data", required=True, help="Dataset the teacher was trained on, e.g. cifar100:~/data.")
@click.option(
    "--calibration",
    type=click.Path(dir_okay=False),
    help="Calibration file (default: the one shipped for the dataset's family).",
)
@click.option(
    "--validation",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Images per class the teacher's search held out as its validation split (data.validation): "
    "the gap is measured on the images it trained on, as the search measured it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--tracking-uri", help="Log to MLflow (default: MLFLOW_TRACKING_URI if set, else no logging).")
@click.option("--device", help="cpu, cuda or cuda:N (default: cuda when available).")
def suggest_beta_command(
    teacher_model: str,
    teacher_checkpoint: str,
    data: str,
    calibration: str | None,
    validation: int,
    as_json: bool,
    tracking_uri: str | None,
    device: str | None,
) -> None:
    """Measure a teacher's logit gap z_t - z_max and suggest DKD's beta as a distribution to search from.

    Prints the gap statistics (mean, median, std, share of samples the teacher gets wrong), the
    teacher's top-1, the suggested beta with its spread and 80% interval, how far the calibration
    can be trusted, and a ready `space:` snippet (a `prior:`) for a search file.
    """
    from dkd_tune.commands.suggest import suggest_beta

    report = suggest_beta(
        teacher_model,
        teacher_checkpoint,
        data,
        calibration=calibration,
        validation=validation,
        device=device,
        tracking_uri=tracking_uri,
    )
    click.echo(report.to_json() if as_json else report.text())


@cli.command("models")
@click.option(
    "--family",
    type=click.Choice(["cifar", "imagenet", "detection"]),
    help="Only the CIFAR or the ImageNet networks, or the detectors.",
)
def models_command(family: str | None) -> None:
    """List the model zoo: name, family, parameters (millions, at the family's default class count), input size."""
    from dkd_tune.models.detection import detector_table
    from dkd_tune.models.registry import model_table

    rows = model_table(family) if family != "detection" else []
    detectors = detector_table() if family in (None, "detection") else []
    width = max(len(name) for name in [info.name for info, _ in rows] + [info.name for info, _ in detectors])
    click.echo(f"{'name':<{width}}  family     params (M)  classes  input")
    for info, parameters in rows:
        click.echo(
            f"{info.name:<{width}}  {info.family:<9}  {parameters / 1e6:>10.3f}  {info.default_num_classes:>7}  "
            f"{info.input_size}x{info.input_size}"
        )
    for info, parameters in detectors:  # Faster R-CNN-FPN, at COCO's 80 categories + background
        click.echo(
            f"{info.name:<{width}}  {'detection':<9}  {parameters / 1e6:>10.3f}  {81:>7}  "
            f"{info.image_size}, FPN on {info.backbone}"
        )


@cli.command("ui")
@click.option(
    "--port", default=5000, show_default=True, type=click.IntRange(1, 65535), help="Port to serve on."
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind; 0.0.0.0 exposes the UI (and the store's API) to the network.",
)
@click.option(
    "--tracking-uri",
    help="MLflow store to show (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here).",
)
def ui(port: int, host: str, tracking_uri: str | None) -> None:
    """Start the MLflow UI on the searches' MLflow store to compare trials (Ctrl-C stops it)."""
    from dkd_tune.commands.mlflow_ui import run_ui

    run_ui(tracking_uri, host=host, port=port)


@cli.command("make-synthetic")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder to write cifar-100-python/ into.",
)
@click.option("--classes", default=100, show_default=True, type=int, help="Number of fine classes.")
@click.option(
    "--superclasses", default=20, show_default=True, type=int, help="Groups of classes that share a look."
)
@click.option(
    "--train-per-class", default=500, show_default=True, type=int, help="Training images per class."
)
@click.option("--test-per-class", default=100, show_default=True, type=int, help="Test images per class.")
@click.option("--image-size", default=32, show_default=True, type=int, help="Image side in pixels.")
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Seed; the same parameters give the same files."
)
@click.option(
    "--rotation",
    default=None,
    type=click.IntRange(0, 180),
    help="Largest rotation of a sample's shape, in degrees (default: 0.25 rad, about 14); wider is harder.",
)
def make_synthetic_command(
    out_dir, classes, superclasses, train_per_class, test_per_class, image_size, seed, rotation
) -> None:
    """Generate a synthetic dataset in CIFAR-100's on-disk format (for the demo, tests and CPU-only runs).

    Classes are grouped into superclasses that share a look; some images mix in a sibling class,
    so a trained teacher's non-target probabilities carry class-similarity information.
    Reads back with --data synthetic:OUT. Rewrites nothing if OUT already holds the same dataset.
    """
    from dkd_tune.data.synthetic import make_synthetic

    written = make_synthetic(
        out_dir,
        classes=classes,
        superclasses=superclasses,
        train_per_class=train_per_class,
        test_per_class=test_per_class,
        image_size=image_size,
        seed=seed,
        rotation=rotation,
    )
    click.echo(
        f"synthetic dataset in {written}/cifar-100-python: {classes} classes in {superclasses} superclasses, "
        f"{classes * train_per_class} train / {classes * test_per_class} test images of {image_size}x{image_size}"
    )


# ------------------------------------------------------------------------------------------------
# Searches


def _verbosity_options(function):
    """-v / -q: how much a search prints (see dkd_tune.search.verbosity)."""
    function = click.option(
        "-q", "--quiet", is_flag=True, help="Print only errors and the final summary (for scripts)."
    )(function)
    return click.option(
        "-v", "--verbose", is_flag=True, help="Also print Ray Tune's status tables and the libraries' logs."
    )(function)


def _search_options(verbose: bool, quiet: bool, **settings):
    from dkd_tune.search.options import SearchOptions
    from dkd_tune.search.verbosity import NORMAL, QUIET, VERBOSE

    if verbose and quiet:
        raise UserInputError("-v/--verbose and -q/--quiet: give one of them, not both")
    verbosity = VERBOSE if verbose else QUIET if quiet else NORMAL
    log = print if verbosity > QUIET else (lambda line: None)
    return SearchOptions(verbosity=verbosity, log=log, **settings)


@cli.command("run")
@click.argument("space_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--name", help="Search name (default: the file's name; a timestamp is added if it exists).")
@click.option("--num-samples", type=int, help="Trials per teacher (overrides search.num_samples).")
@click.option(
    "--set",
    "set_values",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a field, e.g. search.seed=3 or epochs=30.",
)
@click.option(
    "--address", help="Ray cluster to join: 'auto' or HOST:PORT (default: a local Ray on 127.0.0.1)."
)
@click.option("--storage", help="Where results and checkpoints go (a path or a URI shared by the cluster).")
@click.option("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db).")
@click.option(
    "--resume", "resume_existing", is_flag=True, help="Continue the search of this --name if it exists."
)
@click.option("--dashboard", is_flag=True, help="Start Ray's dashboard (on 127.0.0.1).")
@_verbosity_options
def run_command(
    space_file,
    name,
    num_samples,
    set_values,
    address,
    storage,
    tracking_uri,
    resume_existing,
    dashboard,
    verbose,
    quiet,
) -> None:
    """Run an ASHA-pruned Optuna search described by a search-space YAML file."""
    from dkd_tune.config.loading import load_search_space

    overrides = [*set_values, *([f"search.num_samples={num_samples}"] if num_samples is not None else [])]
    notes: list[str] = []
    space = load_search_space(
        space_file, overrides, notes
    )  # every check happens here, before Ray is imported
    for note in notes:
        click.echo(f"dkd-tune: {note}")
    from dkd_tune.config.folders import locate_search
    from dkd_tune.search.driver import resume_search, run_search

    options = _search_options(
        verbose,
        quiet,
        name=name,
        address=address,
        storage=storage,
        tracking_uri=tracking_uri,
        dashboard=dashboard,
    )
    if resume_existing:
        try:
            existing = locate_search(name or space.name, storage or space.storage)
        except UserInputError:
            existing = None
        if existing is not None:
            _print_outcome(resume_search(str(existing), options))
            return
    _print_outcome(run_search(space, space_file, options))


@cli.command("check")
@click.argument("space_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--set", "set_values", multiple=True, metavar="KEY=VALUE", help="Override a field, as for run.")
def check_command(space_file, set_values) -> None:
    """Check a search file as `run` would (teacher checkpoints and data opened), train and write nothing."""
    from dkd_tune.commands.check import check_search_file

    click.echo(check_search_file(space_file, set_values))


@cli.command("resume")
@click.argument("name_or_path")
@click.option("--storage", help="Storage the search was run with (default: ./dkd_runs).")
@click.option("--address", help="Ray cluster to join: 'auto' or HOST:PORT.")
@click.option("--tracking-uri", help="MLflow tracking URI (default: the one the search started with).")
@_verbosity_options
def resume_command(name_or_path, storage, address, tracking_uri, verbose, quiet) -> None:
    """Continue an interrupted search: finished trials kept, unfinished ones resumed from checkpoints."""
    from dkd_tune.search.driver import resume_search

    options = _search_options(verbose, quiet, storage=storage, address=address, tracking_uri=tracking_uri)
    _print_outcome(resume_search(name_or_path, options))


@cli.command("sync")
@click.argument("name_or_path")
@click.option("--storage", help="Storage the search was run with (default: ./dkd_runs).")
@click.option("--tracking-uri", help="MLflow tracking URI (default: the one the search ran with).")
def sync_command(name_or_path, storage, tracking_uri) -> None:
    """Fill MLflow from a finished search's folder, after its tracking store was unreachable.

    Every trial's run gets every epoch Ray saved, the statuses, and the search's run its results and
    analysis. Safe to run again: nothing is logged twice.
    """
    from dkd_tune.search.driver import sync_search
    from dkd_tune.search.options import SearchOptions

    if not sync_search(name_or_path, SearchOptions(storage=storage, tracking_uri=tracking_uri)):
        sys.exit(1)
    click.echo(f"dkd-tune: MLflow is in line with search {name_or_path!r}")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and value == value and abs(value) != float("inf")


def _print_outcome(outcome) -> None:
    click.echo("")
    click.echo(outcome.table)
    click.echo("")
    if outcome.best:
        best = outcome.best
        hyper = ", ".join(
            f"{key}={best[key]:.4g}" if isinstance(best[key], float) else f"{key}={best[key]}"
            for key in ("beta", "alpha", "temperature", "warmup_epochs", "lr")
            if key in best
        )
        click.echo(
            f"best trial: {best['trial_id']} (teacher {best['teacher']}, loss {best['loss']}): {hyper}"
        )
        # Classifiers are scored by top-1 (%), detectors by COCO AP.
        detection = _finite(best.get("final_test_ap"))
        score, unit, split = ("AP", "", "ap") if detection else ("top-1", "%", "acc")
        chosen_on = ""
        if _finite(best.get(f"final_val_{split}")):
            chosen_on = f"final validation {score} {best[f'final_val_{split}']:.2f}{unit} (chosen on it), "
        click.echo(
            f"  {chosen_on}final test {score} {best[f'final_test_{split}']:.2f}{unit}, checkpoint {best.get('checkpoint_path')}"
        )
        predicted = best.get("predicted_beta")
        if isinstance(predicted, float) and predicted == predicted and "beta" in best:
            click.echo(
                f"  auto-beta's suggestion for teacher {best['teacher']}: beta {predicted:.3g} "
                f"(the search's best: {best['beta']:.3g}; dkd-tune suggest-beta explains it)"
            )
        for part, accuracy in outcome.references.items():
            gain = best[f"final_test_{split}"] - accuracy
            click.echo(
                f"  reference {part}: final test {score} {accuracy:.2f}{unit} (best trial {gain:+.2f} points)"
            )
    else:
        click.echo("no trial completed its full budget")
    click.echo(f"results: {outcome.results_path}")
    from analysis.search_analysis import MLFLOW_ARTIFACT_DIR

    analysis_dir = outcome.experiment_dir / MLFLOW_ARTIFACT_DIR
    if analysis_dir.is_dir():
        click.echo(f"analysis (tables.md and figures): {analysis_dir}")
    click.echo("compare the trials: dkd-tune ui  (MLflow UI on http://127.0.0.1:5000)")


@cli.command("analyze")
@click.argument("name_or_path")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder to write into (default: the search's analysis/ folder, or ./NAME-analysis for an MLflow run).",
)
@click.option("--storage", help="Storage the search was run with (default: ./dkd_runs).")
@click.option(
    "--tracking-uri",
    help="MLflow store to read a search from when no folder is found, and to log to "
    "(default: the search's own, else MLFLOW_TRACKING_URI, else ./mlflow.db).",
)
@click.option(
    "--no-mlflow", is_flag=True, help="Do not log the tables and figures to the search's MLflow run."
)
def analyze_command(name_or_path, out, storage, tracking_uri, no_mlflow) -> None:
    """Tables (Markdown), Parquet and figures (PNG) of a finished search, from its folder or its MLflow run.

    NAME_OR_PATH is the search's folder, its name under --storage, or the name or run id of its MLflow
    parent run. Writes results.parquet (one row per trial), histories.parquet (one row per trial and
    epoch), tables.md and three figures, logs them to the search's MLflow run, and prints the main table.
    """
    from analysis.search_analysis import analyze_search

    outputs = analyze_search(
        name_or_path, out=out, storage=storage, tracking_uri=tracking_uri, log_to_mlflow=not no_mlflow
    )
    click.echo(outputs.main_table())
    for note in outputs.notes:
        click.echo(f"note: {note}")
    click.echo("")
    click.echo(f"wrote {outputs.results_path}, {outputs.histories_path.name}, {outputs.tables_path.name}, "
               + ", ".join(path.name for path in outputs.figures) + f" in {outputs.out_dir}")  # fmt: skip
    if outputs.logged_to:
        click.echo(f"logged to MLflow {outputs.logged_to} (artifacts under analysis/)")


@cli.command("validate-beta")
@click.argument("space_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--name", help="Validation name (default: the file's name); an existing one is resumed.")
@click.option(
    "--set",
    "set_values",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a field, e.g. search.num_samples=16.",
)
@click.option("--storage", help="Where the validation's folder goes (default: the file's storage).")
@click.option("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db).")
@click.option("--address", help="Ray cluster to join: 'auto' or HOST:PORT (default: a local Ray).")
@click.option(
    "--calibration",
    type=click.Path(dir_okay=False),
    help="A calibration file fitted elsewhere (e.g. on another instance of the data), checked on this grid.",
)
@click.option(
    "--resamples",
    type=click.IntRange(min=100),
    default=2000,
    show_default=True,
    help="Bootstrap resamples (over teachers as clusters, each with all its seeds).",
)
@click.option(
    "--search-trials",
    type=click.IntRange(min=2),
    default=12,
    show_default=True,
    help="Trials of each replayed ASHA-pruned Optuna search.",
)
def validate_beta_command(
    space_file, name, set_values, storage, tracking_uri, address, calibration, resamples, search_trials
) -> None:
    """Is auto-beta's beta as good as the best beta? Ground truth: a grid of betas x seeds per teacher.

    SPACE_FILE gives at least 3 teachers, beta as a log2 grid (beta: {grid: [0.5, 1, 2, 4, 8]}),
    seed as a grid of at least 2 seeds, metric val_acc with data.validation, search.algorithm grid
    and an ASHA scheduler. Every cell trains its full budget (the scheduler only shapes the replayed
    searches). On the grid it compares, by regret on the test split with the beta chosen on the
    validation split: auto-beta refitted without the teacher (leave-one-teacher-out), the constant
    baseline, and an ASHA-pruned Optuna search replayed on the grid's curves; 95% bootstrap intervals
    of the differences; the calibration fitted on every teacher is written beside the report.
    Run the same command again to resume an interrupted validation.
    """
    import shlex

    from dkd_tune.config.loading import load_search_space

    space = load_search_space(space_file, list(set_values))
    from dkd_tune.commands.validate import ValidationOptions, check_validation_space, validate_beta

    check_validation_space(space, space_file)
    command = "dkd-tune " + " ".join(shlex.quote(argument) for argument in sys.argv[1:])
    outcome = validate_beta(
        space,
        space_file,
        ValidationOptions(
            name=name,
            storage=storage,
            tracking_uri=tracking_uri,
            address=address,
            calibration=calibration,
            resamples=resamples,
            search_trials=search_trials,
            command=command,
        ),
    )
    click.echo("")
    click.echo(outcome.summary)
    click.echo("")
    click.echo(f"report: {outcome.report_path}")
    click.echo(
        f"calibration: {outcome.calibration_path}; comparison: {outcome.comparison_path}; figures: "
        + ", ".join(str(path) for path in outcome.figures)
    )


@cli.command("download-teachers")
@click.option(
    "--to",
    "destination",
    default="~/checkpoints",
    show_default=True,
    help="Folder to unpack cifar_teachers/ into (where search_spaces/cifar_*.yaml look).",
)
@click.option(
    "--url", default=None, help="Another copy of cifar_teachers.tar (default: mdistiller's release)."
)
@click.option(
    "--detection",
    is_flag=True,
    help="The COCO teachers instead: Detectron2's R101-FPN and R50-FPN (3x), converted into <to>/coco_teachers/.",
)
def download_teachers_command(destination: str, url: str | None, detection: bool) -> None:
    """Download the paper's CIFAR-100 teachers (mdistiller's cifar_teachers.tar), check and unpack them;
    with --detection its COCO teachers, converted into this project's checkpoints."""
    from dkd_tune.commands.download_teachers import (
        CIFAR_TEACHERS_URL,
        download_detection_teachers,
        download_teachers,
    )

    if detection:
        if url:
            raise UserInputError(
                "--url names a copy of cifar_teachers.tar; it does not apply with --detection"
            )
        download_detection_teachers(destination, log=click.echo)
        return
    download_teachers(destination, url=url or CIFAR_TEACHERS_URL, log=click.echo)


@cli.command("schema")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON Schema of a search file instead.")
def schema_command(as_json: bool) -> None:
    """Every key of a search file, recipe fields included: its type, default and meaning."""
    if as_json:
        import json

        from dkd_tune.config.schema import SearchSpaceFile

        click.echo(json.dumps(SearchSpaceFile.model_json_schema(by_alias=True), indent=2))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from dkd_tune.config.schema_table import schema_rows

    table = Table(
        title="Search file keys (<name>: a name you choose; []: each list item)", title_justify="left"
    )
    table.add_column("key", no_wrap=True)
    table.add_column("type", max_width=30, overflow="fold")
    table.add_column("default", max_width=22, overflow="fold")
    table.add_column("meaning", ratio=1, overflow="fold")
    for row in schema_rows():
        # Literal text: "[low, high]" is not rich markup.
        table.add_row(*(escape(str(cell)) for cell in (row.key, row.type, row.default, row.meaning)))
    Console(width=max(Console().width, 140), soft_wrap=False).print(table)


# ------------------------------------------------------------------------------------------------
# Single runs


def _single_run_options(function):
    options = [
        click.option("--data", required=True, help="Dataset, e.g. cifar100:~/data or synthetic:./demo_data."),
        click.option(
            "--out",
            "out_dir",
            required=True,
            type=click.Path(path_type=Path, file_okay=False),
            help="Output folder (best.pt, last.pt).",
        ),
        click.option(
            "--set",
            "set_values",
            multiple=True,
            metavar="KEY=VALUE",
            help="Override a recipe field, e.g. epochs=30.",
        ),
        click.option(
            "--tracking-uri", help="Log to MLflow (default: MLFLOW_TRACKING_URI if set, else no logging)."
        ),
        click.option("--experiment", help="MLflow experiment name."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint."),
        click.option("--device", help="cpu, cuda or cuda:N (default: cuda when available)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@cli.command("train-teacher")
@click.option("--model", required=True, help="Teacher architecture, e.g. wrn_40_2.")
@click.option("--recipe", default="teacher-cifar100", show_default=True, help="Recipe preset.")
@_single_run_options
def train_teacher_command(
    model, recipe, data, out_dir, set_values, tracking_uri, experiment, resume, device
) -> None:
    """Train a network with cross-entropy (a teacher, or a student baseline)."""
    from dkd_tune.commands.single_run import RunSettings, train_teacher

    train_teacher(
        model, RunSettings(data, out_dir, recipe, set_values, tracking_uri, experiment, resume, device)
    )


@cli.command("distill")
@click.option("--teacher-model", required=True, help="Teacher architecture, e.g. resnet32x4.")
@click.option("--teacher-checkpoint", required=True, type=click.Path(dir_okay=False), help="Teacher weights.")
@click.option("--student", required=True, help="Student architecture, e.g. resnet8x4.")
@click.option(
    "--loss",
    "loss_mode",
    type=click.Choice(LOSS_MODE_NAMES),
    default="dkd",
    show_default=True,
    help="; ".join(f"{mode.name}: {mode.objective}" for mode in LOSS_MODES.values()),
)
@click.option("--recipe", default="cifar100", show_default=True, help="Recipe preset.")
@_single_run_options
def distill_command(
    teacher_model,
    teacher_checkpoint,
    student,
    loss_mode,
    recipe,
    data,
    out_dir,
    set_values,
    tracking_uri,
    experiment,
    resume,
    device,
) -> None:
    """Distil a student from a trained teacher (one run, no search)."""
    from dkd_tune.commands.single_run import RunSettings, distill

    distill(
        student,
        teacher_model,
        teacher_checkpoint,
        loss_mode,
        RunSettings(data, out_dir, recipe, set_values, tracking_uri, experiment, resume, device),
    )


@cli.command("probe")
@click.option(
    "--checkpoint",
    required=True,
    type=click.Path(dir_okay=False),
    help="Student checkpoint (dkd-tune best.pt, mdistiller file or state dict).",
)
@click.option(
    "--dataset", required=True, type=click.Choice(["stl10", "tiny-imagenet"]), help="Probe dataset."
)
@click.option(
    "--data-root",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder holding stl10_binary/ or tiny-imagenet-200/.",
)
@click.option("--model", "model_name", help="Architecture, for checkpoints that do not record it.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--tracking-uri", help="Log to MLflow (default: MLFLOW_TRACKING_URI if set, else no logging).")
@click.option(
    "--parent-run-id", help="The student's MLflow run: the probe run is nested under it and tagged with it."
)
@click.option("--experiment", help="MLflow experiment (default: the parent run's, else 'probe').")
@click.option("--device", help="cpu, cuda or cuda:N (default: cuda when available).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the head's init and shuffles.")
def probe_command(
    checkpoint, dataset, data_root, model_name, as_json, tracking_uri, parent_run_id, experiment, device, seed
) -> None:
    """Linear probe of a student's frozen features on STL-10 or Tiny-ImageNet (paper A.7).

    Features from the student's global average pool, computed once; a linear layer trained with
    SGD (momentum 0.9, no weight decay) for 40 epochs, lr 0.1 at batch 128, x0.1 every 10 epochs.
    """
    import json

    from dkd_tune.search.transfer_probes import probe_command as run_probe

    result, run_id = run_probe(
        checkpoint,
        dataset,
        data_root,
        model_name=model_name,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
        experiment=experiment,
        device=device,
        seed=seed,
        progress=not as_json,
    )
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "mlflow_run_id": run_id}))
        return
    click.echo(
        f"probe of {result.arch} ({result.checkpoint}) on {result.dataset} at {result.input_size}x{result.input_size}: "
        f"{result.num_train} train / {result.num_test} test images, {result.num_classes} classes, "
        f"{result.feature_dim} features"
    )
    click.echo(f"train top-1 {result.train_acc:.2f}%  test top-1 {result.test_acc:.2f}%")
    click.echo(
        f"time: features {result.extract_seconds:.1f}s, head {result.train_seconds:.1f}s "
        f"({result.protocol.epochs} epochs) on {result.device}"
    )
    if run_id:
        click.echo(f"MLflow run {run_id}" + (f" (under {parent_run_id})" if parent_run_id else ""))


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        cli.main(args=argv, prog_name="dkd-tune", standalone_mode=False)
    except UserInputError as error:
        click.echo(f"dkd-tune: error: {error}", err=True)
        sys.exit(2)
    except click.exceptions.NoArgsIsHelpError as error:
        click.echo(error.ctx.get_help() if error.ctx else str(error))
        sys.exit(2)
    except click.UsageError as error:
        command = error.ctx.command_path if error.ctx else "dkd-tune"
        click.echo(f"{command}: error: {error.format_message()} (see '{command} --help')", err=True)
        sys.exit(2)
    except click.ClickException as error:
        click.echo(f"dkd-tune: error: {error.format_message()}", err=True)
        sys.exit(error.exit_code)
    except SearchInterrupted as interruption:
        resume = f": to continue, run {interruption.resume_command}" if interruption.resume_command else ""
        click.echo(
            f"dkd-tune: interrupted by {interruption.signal_name}; nothing finished is lost{resume}", err=True
        )
        sys.exit(interruption.exit_code)
    except click.exceptions.Abort:
        click.echo("dkd-tune: aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exit_request:
        sys.exit(exit_request.exit_code)


if __name__ == "__main__":
    main()
