"""`vlmops`: the command line.

    vlmops run -c configs/demo.yaml [--set sft.learning_rate=1e-4 ...]
    vlmops validate -c configs/demo.yaml [--set ...]
    vlmops evaluate models:/NAME@candidate -c configs/demo.yaml [--set ...]
    vlmops promote NAME VERSION          # make VERSION the champion by hand
    vlmops rollback NAME                 # champion back to the previous version

Exit codes: 0 done, 1 the data failed its checks (or a promotion / rollback could not be
done), 2 the recipe is invalid, 3 this machine cannot run the recipe (said before any model
loads: fp16 without a GPU, weights too big, ...), 4 MLflow does not answer.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Our modules log through the standard library; this lets Prefect show those lines in its run logs.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks")
# The offline default must not try to reach the internet: Prefect's telemetry would, and log an error.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmops", description="Fine-tune vision-language models: Prefect + MLflow.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("promote", "make a registered version the champion by hand (the replaced one becomes 'previous')"),
        ("rollback", "give 'champion' back to the 'previous' version"),
        ("run", "run the fine-tuning flow (validate, format, SFT, DPO, evaluate, register)"),
        ("validate", "run only the data checks; exits 1 with a report when the data fails them"),
        ("evaluate", "evaluate a registered adapter on the recipe's held-out split"),
    ):
        command = commands.add_parser(name, help=help_text)
        if name in ("promote", "rollback"):
            command.add_argument("registered_model", help="registered model name, e.g. vlmops-demo-adapter")
            if name == "promote":
                command.add_argument("version", help="version number to promote")
            command.add_argument("--champion-alias", default="champion")
            command.add_argument("--previous-alias", default="previous")
            continue
        if name == "evaluate":
            command.add_argument("model_uri", help="registered adapter: models:/NAME/VERSION or models:/NAME@ALIAS")
        command.add_argument("-c", "--config", required=True, type=Path, help="recipe YAML, e.g. configs/demo.yaml")
        command.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a recipe field, e.g. --set sft.learning_rate=1e-4 (repeatable)",
        )
    return parser


def _promotion_line(decision) -> str:
    if decision is None:
        return "gate off (promotion.enabled: false)"
    return f"{'PROMOTED to champion' if decision.promote else 'not promoted'}: {decision.reason}"


def format_summary(result) -> str:
    """The end-of-run table: base / SFT / DPO side by side, then where to find everything."""
    from mlflow import MlflowClient

    if result.skipped:
        return f"\nnothing trained: {result.skipped}\nMLflow run: {result.run_id}"
    models = list(result.metrics)
    metric_names = [name for name in result.metrics[models[0]] if not name.startswith("eval_samples")]
    width = max(len(name) for name in metric_names) + 2
    lines = ["", "metric".ljust(width) + "".join(model.rjust(10) for model in models)]
    for name in metric_names:
        lines.append(name.ljust(width) + "".join(f"{result.metrics[m][name]:10.3f}" for m in models))
    samples = int(result.metrics[models[0]]["eval_samples"])
    experiment_id = MlflowClient(result.tracking_uri).get_run(result.run_id).info.experiment_id
    registered = result.registered
    lines += [
        f"(held-out samples: {samples})",
        "",
        f"MLflow run:        {result.run_id}",
        f"registered model:  {registered.name} version {registered.version} (alias '{registered.alias}')",
        f"promotion:         {_promotion_line(result.promotion)}",
        f"run outputs:       {result.run_dir}",
        f"comparison:        {result.report['md']} (chart: {result.report['png']})",
        f"prediction gallery: {result.report['gallery']}",
        "open it in the MLflow UI:",
        f"  .venv/bin/mlflow ui --backend-store-uri {result.tracking_uri} --port 5000",
        f"  then http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{result.run_id}",
    ]
    return "\n".join(lines)


def _promote(args) -> int:
    from flows.promote import promote
    from tasks.config import PromotionConfig
    from tasks.promotion import PromotionError
    from tasks.tracking import TrackingUnavailableError, check_tracking_available

    policy = PromotionConfig(champion_alias=args.champion_alias, previous_alias=args.previous_alias)
    try:
        check_tracking_available()
        result = promote(args.registered_model, getattr(args, "version", None), args.command, policy)
    except TrackingUnavailableError as error:
        print(error, file=sys.stderr)
        return 4
    except PromotionError as error:
        print(error, file=sys.stderr)
        return 1
    for alias, version in result.items():
        print(f"{alias:12s} {version if version is not None else '-'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("promote", "rollback"):
        return _promote(args)
    from tasks.config import ConfigError, load_recipe

    try:
        recipe = load_recipe(args.config, args.overrides)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2

    if args.command == "validate":
        from flows.validate import validate

        reports = validate(recipe)
        for report in reports:
            print(report.summary(), end="\n\n")
        failed = [report.dataset for report in reports if not report.passed]
        if failed:
            print(f"data checks FAILED for {', '.join(failed)}", file=sys.stderr)
            return 1
        print("data checks passed")
        return 0

    from tasks.validation import DataValidationError

    if args.command == "evaluate":
        from flows.evaluate import evaluate

        try:
            metrics = evaluate(args.model_uri, recipe)
        except DataValidationError as error:
            print(error, file=sys.stderr)
            return 1
        for name, value in metrics.items():
            print(f"{name:32s} {value:10.4f}")
        return 0

    from flows.finetune import finetune
    from tasks.models import HardwareError
    from tasks.tracking import TrackingUnavailableError

    try:
        result = finetune(recipe)
    except DataValidationError as error:
        print(error, file=sys.stderr)
        return 1
    except HardwareError as error:
        print(error, file=sys.stderr)
        return 3
    except TrackingUnavailableError as error:
        print(error, file=sys.stderr)
        return 4
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
