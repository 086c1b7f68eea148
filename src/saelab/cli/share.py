"""`saelab export`: an SAE written in the folder layout another tool loads (SAELens, sparsify)."""

from __future__ import annotations

import argparse
import copy
import filecmp
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from saelab.cli.common import DTYPES, add_io_options, add_sae_argument, add_verb
from saelab.errors import ConfigError
from saelab.run_folder import (check_output_folder, check_sae_hook, model_for, model_left_behind, names_a_model,
                               open_sae)
from saelab.sae.config import SAVE_FORMATS


def add_export(sub) -> None:
    p = add_verb(sub, "export",
                 description="Write an SAE in SAELens' folder layout (SAE.load_from_disk) or sparsify's (SparseCoder."
                             "load_from_disk); the SAE's hook, model and BOS settings go with it. No path of "
                             "this disk does: a local training corpus or model folder is named by its base name "
                             "(saelab reads such an export with --model PATH to the folder).")
    add_sae_argument(p, "the SAE to write:")
    p.add_argument("out", metavar="OUT", help="folder to write: new or empty (--overwrite replaces an SAE there)")
    p.add_argument("--format", choices=SAVE_FORMATS, required=True,
                   help="saelens: cfg.json + sae_weights.safetensors; sparsify: cfg.json + sae.safetensors "
                        "(+ saelab.json, which sparsify ignores)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="store the weights in this dtype (default: float32, as loaded)")
    p.add_argument("--hook", default=None,
                   help="the hook the SAE reads (blocks.L.hook_KIND), written into OUT: needed where the SAE records "
                        "none (an OpenAI .pt file outside its release layout), else it replaces the recorded one")
    add_io_options(p, device=False)
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from saelab.models import check_hook_layer
    from saelab.models.config import check_hook_form
    from saelab.sae import save_sae

    out = _check_export_folder(Path(args.out))
    if args.hook is not None:
        check_hook_form(args.hook)
    sae, _ = open_sae(args.sae, allow_http=args.allow_http)
    if args.hook is not None:
        # past its model's layers: refused as every verb that reads it would (a model an export left behind is
        # not at hand to check)
        if names_a_model(sae) and model_left_behind(sae) is None:
            check_hook_layer(model_for(sae), args.hook)
        sae.cfg.hook_name = args.hook
    check_sae_hook(sae, args.sae)  # other tools find the activations by it: without one OUT is unusable
    recorded, sae.cfg = sae.cfg, _shared_config(sae.cfg)
    if args.dtype is not None:
        sae = sae.to(getattr(torch, args.dtype))
    if (out / "cfg.json").is_file() and not args.overwrite:
        if not _holds_this_export(out, sae, args.format) and not _holds_earlier_fingerprint(out, sae, recorded,
                                                                                             args.format):
            if any(_holds_this_export(out, sae, args.format, cfg=earlier) for earlier in _earlier_exports(recorded)
                   if earlier != sae.cfg):
                raise ConfigError(f"OUT {out} holds this export as an earlier saelab wrote it, with local paths (of "
                                  "the training corpus or the model) or without the corpus's fingerprint; pass "
                                  "--overwrite to write it again, fit to share")
            raise ConfigError(f"OUT {out} holds an SAE already, not this export (another SAE, format, dtype or hook); "
                              "pass --overwrite to replace it, or pick another folder")
        print(f"{out} already holds this export (--overwrite writes it again)", file=sys.stderr)
    else:
        save_sae(sae, out, format=args.format)
    return {"sae": str(out), "format": args.format, "files": sorted(p.name for p in out.iterdir())}


def _holds_earlier_fingerprint(out: Path, sae, recorded, fmt: str) -> bool:
    """Whether OUT holds this export with the training corpus's fingerprint an export took before a folder's marked
    how each file is read (taken by the export for an SAE of an earlier saelab alone: :func:`_shared_config`): the
    same export, its fingerprint compared as it was taken."""
    then = _shared_config(recorded, earlier_fingerprint=True)
    return then != sae.cfg and _holds_this_export(out, sae, fmt, cfg=then)


def _shared_config(cfg, earlier_fingerprint: bool = False):
    """``cfg`` as a file shared with others records it: no path of this disk, which means nothing on another machine.
    The training corpus and the file the SAE was read from by their base names (:func:`_corpus_by_name`), with the
    fingerprint of the corpus's content as its harvest recorded it (taken now for an SAE of an earlier saelab), by
    which an evaluation on that text is told under any name; a local model folder by its base name, marked so that
    saelab asks for the folder rather than load a hub model of that name (:func:`shared_model_record`).
    ``earlier_fingerprint``: a folder's fingerprint taken as exports took it before (its files' bytes alone)."""
    import dataclasses

    from saelab.data.text import CORPUS_FINGERPRINT, READ_AS_SCHEME, corpus_fingerprint

    named = _corpus_by_name(cfg)
    model_name, model_source = shared_model_record(cfg.model_name, named.extra.get("model_source"))
    extra = {**named.extra, **({} if model_source is None else {"model_source": model_source})}
    # A run's harvest records the fingerprint; one of an earlier saelab has none, taken here where its corpus is an
    # absolute path (the file trained on; a relative one, read from this folder, could be another file).
    if CORPUS_FINGERPRINT not in extra and cfg.dataset and Path(cfg.dataset).expanduser().is_absolute():
        # a corpus since moved or deleted: none
        fingerprint = corpus_fingerprint(cfg.dataset, None if earlier_fingerprint else READ_AS_SCHEME)
        if fingerprint is not None:
            extra[CORPUS_FINGERPRINT] = fingerprint
    return dataclasses.replace(named, model_name=model_name, extra=extra)


def shared_model_record(model_name: str, source: Any) -> tuple[str, Any]:
    """(model_name, model_source) as an export records them: a local model folder or .gguf file (by its path as
    recorded, which may since have moved) by its base name under a ``run_folder.LOCAL_MODELS`` key; a hub id or the offline
    default as recorded."""
    from saelab.models.loading import DEFAULT_MODEL, is_hub_id  # lazy: the model loader imports torch

    spec = source["spec"] if isinstance(source, dict) and isinstance(source.get("spec"), str) else model_name
    if not spec or spec == DEFAULT_MODEL or is_hub_id(spec):  # a relative path to a folder here is local too
        return model_name, source
    name = Path(os.path.abspath(Path(spec).expanduser())).name
    return name, {"local_file" if name.endswith(".gguf") else "local_folder": name}


def _corpus_by_name(cfg):
    """``cfg`` with its training corpus and the file it was read from by their base names (a hub dataset by its
    name), as an export recorded it before its model and its corpus's fingerprint (:func:`_shared_config`); the
    corpus's absolute path that the run records beside its name is left out."""
    import dataclasses

    from saelab.data.text import CORPUS_PATH, shared_corpus_name

    extra = {key: value for key, value in cfg.extra.items() if key != CORPUS_PATH}
    source = extra.get("source")
    if isinstance(source, dict) and isinstance(source.get("path"), str):
        extra = {**extra, "source": {**source, "path": Path(os.path.abspath(source["path"])).name}}
    return dataclasses.replace(cfg, dataset=shared_corpus_name(cfg.dataset), extra=extra)


def _earlier_exports(recorded) -> list:
    """The configs earlier saelabs wrote into an export of an SAE that records ``recorded``: as recorded (local paths
    in it), and with the corpus by its base name alone (the model as recorded, no fingerprint)."""
    return [recorded, _corpus_by_name(recorded)]


def _check_export_folder(out: Path) -> Path:
    """A new or empty folder, or one that holds an SAE: never a folder of other files, nor a run folder, a folder
    inside one or a sweep folder."""
    from saelab.sae.io import refuse_a_run_folder

    check_output_folder(out, "OUT")
    refuse_a_run_folder(out, f"OUT {out}")
    if out.is_dir() and any(out.iterdir()) and not (out / "cfg.json").is_file():
        raise ConfigError(f"OUT {out} holds other files; expected a new or empty folder")
    return out


def _holds_this_export(out: Path, sae, fmt: str, cfg=None) -> bool:
    """Whether OUT's files are byte for byte the ones this export writes (of ``sae`` with ``cfg`` when given). The
    folder records every input and setting itself (weights, config, layout, dtype), and other tools read it: no key
    file beside them."""
    from saelab.sae import save_sae

    if cfg is not None:
        sae = copy.copy(sae)
        sae.cfg = cfg
    try:  # beside OUT (OUT may be "."): room for one more SAE there
        with tempfile.TemporaryDirectory(dir=out.resolve().parent) as scratch:
            fresh = save_sae(sae, Path(scratch), format=fmt)
            names = sorted(p.name for p in fresh.iterdir())
            if names != sorted(p.name for p in out.iterdir()):
                return False
            same, _, _ = filecmp.cmpfiles(fresh, out, names, shallow=False)
            return len(same) == len(names)
    except OSError:  # no room or no write access beside OUT: not shown to be the same, so not reused
        return False
