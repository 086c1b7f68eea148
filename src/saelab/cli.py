"""`saelab <verb>`: each verb is a thin shell over a public function in saelab.pipeline."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from saelab.errors import SaelabError
from saelab.utils.dataclass_args import add_dataclass_args, dataclass_from_args

QUICKSTART_DIR = "runs/quickstart"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace a finished run or cache in the output folder")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    from saelab.pipeline import EvalConfig, HarvestConfig
    from saelab.train import TrainConfig

    parser = argparse.ArgumentParser(prog="saelab", description="Train, evaluate and explore top-k SAEs.")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("quickstart", help="harvest, train, evaluate and report on the offline default model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=QUICKSTART_DIR, help="run folder")
    add_dataclass_args(p, HarvestConfig, prefix="harvest_", title="activations")
    add_dataclass_args(p, TrainConfig, title="training")
    add_dataclass_args(p, EvalConfig, prefix="eval_", title="evaluation")
    _add_common(p)

    p = sub.add_parser("harvest", help="harvest activations at a hook into an on-disk cache")
    p.add_argument("--out", required=True, help="cache folder")
    add_dataclass_args(p, HarvestConfig, title="activations")
    _add_common(p)

    p = sub.add_parser("train", help="train a top-k SAE on an activation cache")
    p.add_argument("--activations", required=True, help="activation cache folder (from `saelab harvest`)")
    p.add_argument("--out", required=True, help="run folder (an unfinished run there is resumed)")
    add_dataclass_args(p, TrainConfig, title="training")
    _add_common(p)

    p = sub.add_parser("sweep", help="train a grid of SAEs from one pass over an activation cache")
    p.add_argument("--activations", required=True, help="activation cache folder (from `saelab harvest`)")
    p.add_argument("--out", required=True, help="folder for the runs (one subfolder per grid point)")
    p.add_argument("--grid", nargs="+", required=True, metavar="FIELD=V1,V2",
                   help="training options to vary, e.g. n_latents=1024,4096 k=16,32 lr=1e-3,3e-3")
    add_dataclass_args(p, TrainConfig, title="training (shared by every run)")
    p.add_argument("--eval", action="store_true", help="then evaluate every run (core metrics) and write the "
                                                       "scaling report (saelab report OUT)")
    add_dataclass_args(p, EvalConfig, prefix="eval_", title="evaluation (with --eval)")
    _add_common(p)

    p = sub.add_parser("eval", help="evaluate an SAE (run folder, SAELens folder, OpenAI .pt file or URL), "
                                    "or every run of a sweep folder")
    p.add_argument("sae", help="run folder, SAE folder, .pt file, https URL, or a sweep folder")
    p.add_argument("--model", default=None, help="language model (default: the one the SAE was trained on)")
    p.add_argument("--hook", default=None, help="override the SAE's hook name")
    p.add_argument("--out", default=None, help="where to write metrics.json, and evals/ with --suite paper "
                                                "(default: the run folder, if given one)")
    add_dataclass_args(p, EvalConfig, title="evaluation")
    from saelab.evals.suite import add_suite_arguments

    add_suite_arguments(p)
    _add_common(p)

    p = sub.add_parser("report", help="(re)write report.md and plots of a run folder; for a sweep folder the "
                                      "scaling study (scaling.json, scaling_nmse.png, scaling_delta_loss.png)")
    p.add_argument("run", help="run folder or sweep folder")

    from saelab.explore.steering import add_steer_arguments

    p = sub.add_parser("steer", help="generate with and without adding / clamping / ablating an SAE latent")
    add_steer_arguments(p)

    from saelab.explore.browser.pipeline import add_browse_arguments, add_families_arguments

    p = sub.add_parser("browse", help="build (and serve on 127.0.0.1) an offline feature browser for SAEs")
    add_browse_arguments(p)
    p = sub.add_parser("families", help="feature families of SAEs of several sizes on one hook, as JSON")
    add_families_arguments(p)
    return parser


def _cmd_quickstart(args) -> dict:
    from saelab.pipeline import EvalConfig, HarvestConfig, QuickstartConfig, quickstart
    from saelab.train import TrainConfig

    cfg = QuickstartConfig(
        harvest=dataclass_from_args(HarvestConfig, args, prefix="harvest_"),
        train=dataclass_from_args(TrainConfig, args),
        eval=dataclass_from_args(EvalConfig, args, prefix="eval_"),
    )
    metrics = quickstart(cfg, args.out, overwrite=args.overwrite, progress=args.progress)
    print(f"\nreport: {Path(args.out) / 'report.md'}")
    return metrics


def _cmd_harvest(args) -> dict:
    from saelab.pipeline import HarvestConfig, harvest

    cache = harvest(dataclass_from_args(HarvestConfig, args), args.out, overwrite=args.overwrite,
                    progress=args.progress)
    return {"cache": str(cache.folder), "rows": cache.n_rows, "d": cache.d}


def _cmd_train(args) -> dict:
    from saelab.pipeline import train_from_cache
    from saelab.train import TrainConfig

    from saelab.train.distributed import init_from_env

    init_from_env()  # data-parallel when started by torchrun
    sae = train_from_cache(args.activations, args.out, dataclass_from_args(TrainConfig, args),
                           overwrite=args.overwrite, progress=args.progress)
    return {"sae": str(Path(args.out) / "sae"), "n_latents": sae.n_latents, "k": sae.cfg.k}


def parse_grid(items: list[str]) -> dict[str, list]:
    """['n_latents=1024,4096', 'lr=1e-3'] -> {'n_latents': [1024, 4096], 'lr': [0.001]} typed as TrainConfig."""
    import dataclasses

    from saelab.train import TrainConfig
    from saelab.utils.dataclass_args import scalar_type

    types = {f.name: scalar_type(f.type)[0] for f in dataclasses.fields(TrainConfig)}
    grid = {}
    for item in items:
        name, _, values = item.partition("=")
        name = name.strip().replace("-", "_")
        if name not in types or not values:
            raise SaelabError(f"bad --grid entry {item!r}: expected FIELD=V1,V2 with FIELD a training option "
                              f"such as n_latents, k, lr")
        kind = types[name]
        parse = (lambda v: v.lower() in ("1", "true", "yes")) if kind is bool else kind
        grid[name] = [parse(v) for v in values.split(",")]
    return grid


def _cmd_sweep(args) -> dict:
    from saelab.pipeline import sweep_from_cache
    from saelab.train import TrainConfig
    from saelab.train.distributed import init_from_env

    init_from_env()
    saes = sweep_from_cache(args.activations, args.out, dataclass_from_args(TrainConfig, args),
                            parse_grid(args.grid), overwrite=args.overwrite, progress=args.progress)
    if args.eval:
        from saelab.evals.suite import evaluate_sweep
        from saelab.pipeline import EvalConfig
        from saelab.report.scaling import write_scaling_report

        evaluate_sweep(args.out, dataclass_from_args(EvalConfig, args, prefix="eval_"), overwrite=args.overwrite,
                       progress=args.progress)
        write_scaling_report(args.out)
    return {name: str(Path(args.out) / name / "sae") for name in saes}


def _cmd_eval(args) -> dict:
    from saelab.evals.suite import eval_command, is_sweep_folder
    from saelab.pipeline import EvalConfig, evaluate
    from saelab.sae import load_sae
    from saelab.train.checkpoint import SAE_DIR

    if args.suite != "core" or is_sweep_folder(args.sae):
        return eval_command(args)
    source = Path(args.sae)
    is_run = source.is_dir() and (source / SAE_DIR).is_dir()
    sae = load_sae(source / SAE_DIR if is_run else args.sae)
    if args.hook:
        sae.cfg.hook_name = args.hook
    if not sae.cfg.hook_name:
        raise SaelabError(f"SAE {args.sae} records no hook (an OpenAI .pt file outside its release layout "
                          ".../resid_post_mlp_v5_32k/autoencoders/8.pt, say); pass --hook blocks.8.hook_resid_post")
    out = args.out or (str(source) if is_run else None)
    metrics = evaluate(sae, lm=args.model, cfg=dataclass_from_args(EvalConfig, args), out_dir=out,
                       progress=args.progress)
    if is_run and out == str(source):
        from saelab.report.markdown import write_run_report
        write_run_report(source)
    return metrics


def _cmd_steer(args) -> dict:
    from saelab.explore.steering import steer_command

    return steer_command(args)


def _cmd_browse(args) -> dict:
    from saelab.explore.browser.pipeline import browse_command

    return browse_command(args)


def _cmd_families(args) -> dict:
    from saelab.explore.browser.pipeline import families_command

    return families_command(args)


def _cmd_report(args) -> dict:
    from saelab.evals.suite import is_sweep_folder
    from saelab.report.markdown import write_run_report
    from saelab.train.checkpoint import TRAIN_CONFIG

    if is_sweep_folder(args.run):
        from saelab.report.scaling import write_scaling_report

        fits = write_scaling_report(args.run)["fits"]
        return {"report": str(Path(args.run) / "scaling.md"),
                **{label: {"alpha": f.get("alpha"), "c": f.get("c"), "monotone": f.get("monotone")}
                   for label, f in fits.items()}}
    if not (Path(args.run) / TRAIN_CONFIG).exists():
        raise SaelabError(f"{args.run} is neither a run folder (with {TRAIN_CONFIG}) nor a sweep folder of runs")
    return {"report": str(write_run_report(args.run))}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"quickstart": _cmd_quickstart, "harvest": _cmd_harvest, "train": _cmd_train, "sweep": _cmd_sweep,
               "eval": _cmd_eval, "report": _cmd_report, "steer": _cmd_steer, "browse": _cmd_browse,
               "families": _cmd_families}[args.verb]
    try:
        result = handler(args)
    except SaelabError as e:
        print(f"saelab {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nsaelab {args.verb}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
