"""`reco` commands that use a trained fusion: predict, eval zero-shot, eval retrieval, demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .base import (
    CollectionOpt,
    GateOpt,
    JsonOpt,
    KindOpt,
    MemoryOpt,
    ModelOpt,
    PretrainedOpt,
    ProgressOpt,
    WeightsOpt,
    _emit,
    _encoder,
    _load_shards,
    _must_exist,
    _open,
    app,
    cli_errors,
    eval_app,
    out,
)


def _classes(classes: str) -> list[str]:
    p = Path(classes)
    if p.is_file():
        return [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return [c.strip() for c in classes.split(",") if c.strip()]


def _classifier(memory: str | None, collection: str, fusion_path: Path | None, model: str, pretrained: str | None,
                kind: str, retrieval: bool = True, weights: str = "zero-shot", gate: str | None = None,
                progress: bool = False) -> tuple[Any, Any]:
    from ..classifier import GATES, RecoClassifier
    from ..fusion import FusionModel

    if weights != "zero-shot" and (fusion_path is None or not retrieval):
        raise ValueError(f"--weights {weights} selects a fusion model's weights: give --fusion")
    if gate is not None and gate not in GATES:
        raise ValueError(f"--gate must be one of {', '.join(GATES)}, got {gate!r}")
    if gate not in (None, "none") and (fusion_path is None or not retrieval):
        raise ValueError(f"--gate {gate} mixes RECO's scores with the encoder's: give --fusion")
    if retrieval and fusion_path is not None:
        _must_exist(memory, collection)  # RECO retrieves from it: before any encoder is loaded, creating nothing
    enc = _encoder(model, pretrained, kind, memory, collection)
    if not retrieval or fusion_path is None:
        return RecoClassifier(encoder=enc, use_retrieval=False), None
    mem = _open(memory, collection, encoder=enc)
    try:
        return RecoClassifier(mem, FusionModel.from_pretrained(fusion_path), encoder=enc, weights=weights,
                              gate=gate, progress=progress), mem
    except Exception:
        mem.close()
        raise


@app.command()
@cli_errors
def predict(images: Annotated[list[Path], typer.Argument(help="image files")],
            classes: Annotated[str, typer.Option(help="class names: a file (one per line) or a comma list")],
            fusion: Annotated[Path | None, typer.Option(help="fusion checkpoint dir (none = plain CLIP)")] = None,
            templates: Annotated[str, typer.Option(
                help="generic | birds | flowers | cars | dogs, or one template like 'a photo of a {}.'")] = "generic",
            memory: MemoryOpt = None, collection: CollectionOpt = "reco_memory", model: ModelOpt = None,
            pretrained: PretrainedOpt = None, encoder_kind: KindOpt = "open_clip", weights: WeightsOpt = "zero-shot",
            gate: GateOpt = None, as_json: JsonOpt = False) -> None:
    """Zero-shot classify images with RECO (or plain CLIP without --fusion)."""
    clf, mem = _classifier(memory, collection, fusion, model, pretrained, encoder_kind, weights=weights, gate=gate,
                           progress=not as_json)
    try:
        clf.set_classes(_classes(classes), templates)
        proba = clf.predict_proba(images)
    finally:
        if mem is not None:
            mem.close()
    res = [{"image": str(p), "class": clf.classes_[int(i)], "probability": float(pr[i])}
           for p, pr, i in zip(images, proba, proba.argmax(1))]
    table = Table("image", "class", "p", title="RECO" if fusion else "plain CLIP")
    for r in res:
        table.add_row(r["image"], r["class"], f"{r['probability']:.3f}")
    _emit(res, as_json, table)


def _report_table(title: str, rows: list[tuple[str, dict]]) -> Table:
    keys = list(rows[0][1])
    table = Table("method", *keys, title=title)
    for name, r in rows:
        table.add_row(name, *[f"{100 * r[k]:.1f}" for k in keys])
    return table


@eval_app.command("zero-shot")
@cli_errors
def eval_zero_shot(folder: Annotated[Path, typer.Argument(help="ImageFolder: FOLDER/<class name>/<image>")],
                   fusion: Annotated[Path, typer.Option(help="fusion checkpoint dir")],
                   templates: Annotated[str, typer.Option(
                       help="generic | birds | flowers | cars | dogs, or one template like 'a photo of a {}.'")] = (
                       "generic"),
                   memory: MemoryOpt = None, collection: CollectionOpt = "reco_memory",
                   model: ModelOpt = None, pretrained: PretrainedOpt = None,
                   encoder_kind: KindOpt = "open_clip", weights: WeightsOpt = "zero-shot", gate: GateOpt = None,
                   output: Annotated[Path | None, typer.Option("--output", help="write JSON here")] = None,
                   as_json: JsonOpt = False) -> None:
    """Zero-shot top-1/top-5, baseline and RECO side by side, same prompts."""
    from ..evaluation import image_folder_dataset, zero_shot_report

    paths, labels, names = image_folder_dataset(folder)
    clf, mem = _classifier(memory, collection, fusion, model, pretrained, encoder_kind, weights=weights, gate=gate,
                           progress=not as_json)
    try:
        clf.set_classes(names, templates)
        res = {**zero_shot_report(clf, clf.encoder.encode_images(paths, progress=not as_json), labels),
               "gate": clf.gate}
    finally:
        mem.close()
    if output:
        output.write_text(json.dumps(res, indent=2))
    reco = "RECO" if res["gate"] == "none" else f"RECO, {res['gate']} gate"
    _emit(res, as_json, _report_table(f"zero-shot on {folder} ({res['n_images']} images, {res['n_classes']} classes)",
                                      [("baseline", res["baseline"]), (reco, res["reco"])]))


@eval_app.command("retrieval")
@cli_errors
def eval_retrieval(pairs: Annotated[Path, typer.Argument(help="paired embeddings, clip-retrieval layout")],
                   fusion: Annotated[Path, typer.Option(help="fusion checkpoint dir")],
                   memory: MemoryOpt = None, collection: CollectionOpt = "reco_memory",
                   output: Annotated[Path | None, typer.Option("--output", help="write JSON here")] = None,
                   as_json: JsonOpt = False) -> None:
    """Image->text and text->image recall@1/5/10, baseline and RECO."""
    from ..classifier import RecoClassifier
    from ..evaluation import retrieval_report
    from ..fusion import FusionModel

    img, txt, *_ = _load_shards(pairs, None, None)
    with _open(memory, collection) as mem:
        res = retrieval_report(RecoClassifier(mem, FusionModel.from_pretrained(fusion)), img, txt)
    if output:
        output.write_text(json.dumps(res, indent=2))
    rows = [(f"{m} {d}", res[m][d]) for m in ("baseline", "reco") for d in ("image_to_text", "text_to_image")]
    _emit(res, as_json, _report_table(f"retrieval on {res['n_pairs']} pairs", rows))


@app.command()
@cli_errors
def demo(memory: MemoryOpt = None,
         seed: Annotated[int, typer.Option(help="seed of the synthetic world and of training")] = 0,
         out_dir: Annotated[Path, typer.Option("--out", help="the demo's checkpoint dir")] = Path("reco-runs/demo"),
         ablations: Annotated[bool, typer.Option(help="also train the paper's ablations")] = True,
         export: Annotated[Path | None, typer.Option(
             help="write the demo world's data here (memory/, train/, eval.npz) instead of running it")] = None,
         progress: ProgressOpt = True, as_json: JsonOpt = False) -> None:
    """RECO end to end on a synthetic fine-grained world: memory, training, baseline vs RECO, ablations."""
    from ..demo import export_demo, run_demo

    if export is not None:
        written = export_demo(export, seed=seed)
        if as_json:
            _emit(written, True)
        for what, where in ({} if as_json else written).items():
            out.print(f"{what}: {where}", highlight=False)
        return

    res = run_demo(memory, seed=seed, out_dir=out_dir, ablations=ablations, progress=progress and not as_json)
    if as_json:
        _emit(res, True)
        return
    m = res["memory"]
    out.print(f"memory: {m['location']} / {m['collection']}: {m['count']:,} image-text pairs "
              f"({m['dim']}-d, {m['index_backend']})")
    table = Table("method", "top-1", "top-5", "best epoch", "train s",
                  title="zero-shot on classes never seen in training, fusion trained without labels "
                  "(synthetic fine-grained world)")
    for r in res["table"]:
        table.add_row(r["method"], f"{100 * r['top1']:.1f}", f"{100 * r['top5']:.1f}", str(r["epoch"]),
                      f"{r['train_s']:.1f}")
    out.print(table)
    for e in res["examples"]:
        out.print(f"\n[bold]image of {e['truth']}[/]: baseline says {e['baseline']}, RECO says {e['reco']}; "
                  "its neighbours' captions:")
        for n in e["neighbours"]:
            out.print(f"  {n['score']:.3f}  {n['caption']}", highlight=False)
    out.print(f"\nfusion checkpoint: {res['checkpoint']}")
