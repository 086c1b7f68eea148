"""`saelab export`: an SAE written in the folder layout another tool loads (SAELens, sparsify)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from saelab.cli.common import DTYPES, add_io_options
from saelab.errors import ConfigError
from saelab.run_folder import SAE_DIR, TRAIN_CONFIG, check_output_folder, open_sae


def add_export(sub) -> None:
    from saelab.sae.io import SAVE_FORMATS

    p = sub.add_parser("export", help="write an SAE as a SAELens or sparsify folder, for other tools to load",
                       description="Write an SAE (run folder, SAE folder, OpenAI .pt file, https URL or hf://) in "
                                   "SAELens' folder layout (SAE.load_from_disk) or sparsify's (SparseCoder."
                                   "load_from_disk); the SAE's hook, model and BOS settings go with it.")
    p.add_argument("sae", help="run folder, SAE folder, .pt file, https URL or hf://owner/repo/path")
    p.add_argument("out", metavar="OUT", help="folder to write: new or empty (--overwrite replaces an SAE there)")
    p.add_argument("--format", choices=SAVE_FORMATS, required=True,
                   help="saelens: cfg.json + sae_weights.safetensors; sparsify: cfg.json + sae.safetensors "
                        "(+ saelab.json, which sparsify ignores)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="store the weights in this dtype (default: float32, as loaded)")
    p.add_argument("--allow-http", action="store_true", help="also download SAEs from plain http URLs")
    add_io_options(p, device=False)
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from saelab.sae import save_sae

    out = _check_export_folder(Path(args.out), args.overwrite)
    sae, _ = open_sae(args.sae, allow_http=args.allow_http)
    if args.dtype is not None:
        sae = sae.to(getattr(torch, args.dtype))
    save_sae(sae, out, format=args.format)
    return {"sae": str(out), "format": args.format, "files": sorted(p.name for p in out.iterdir())}


def _check_export_folder(out: Path, overwrite: bool) -> Path:
    """A new or empty folder, or with --overwrite one that holds an SAE: never a folder of other files."""
    check_output_folder(out, "OUT")
    if (out.parent / TRAIN_CONFIG).is_file() and out.name == SAE_DIR:
        raise ConfigError(f"OUT {out} is the SAE of the run {out.parent}: an export there would make the run "
                          "describe another SAE; pick another folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "cfg.json").is_file():
            raise ConfigError(f"OUT {out} holds other files; expected a new or empty folder")
        if not overwrite:
            raise ConfigError(f"OUT {out} holds an SAE already; pass --overwrite to replace it, or pick another folder")
    return out
