"""`wsi-mil` review commands: heatmap, view (the local review server), evaluate-localization."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import console as opt
from .console import print_localization, say, user_errors
from .errors import WsiMilError


def register(app: typer.Typer) -> None:
    @app.command()
    @user_errors
    def heatmap(
        slide: Annotated[Path, typer.Argument(help="The slide file")],
        run: opt.RunDir,
        out: Annotated[
            Optional[Path], typer.Option("--out", "-o", help="Output folder", show_default="heatmaps")
        ] = None,
        features: Annotated[
            Optional[Path], typer.Option(help="The slide's feature .h5", show_default="from the work folder")
        ] = None,
        work: Annotated[
            Optional[Path],
            typer.Option(
                help="Work folder for the slide's tissue, patches and features",
                show_default="the run's if it holds this slide, else OUT/work",
            ),
        ] = None,
        model: Annotated[
            Optional[str], typer.Option(help="Which model of the run", show_default="the run's first")
        ] = None,
        score: Annotated[
            str,
            typer.Option(
                help="Layer for the PNG and OME-TIFF: combined, patch_alone, attention or inversion"
            ),
        ] = "combined",
        overlap: Annotated[
            float, typer.Option(help="Patch overlap when extracting (0.5 for a finer map)")
        ] = 0.0,
        fold: Annotated[str, typer.Option(help="'all' (ensemble) or a fold number")] = "all",
        target: Annotated[
            Optional[str],
            typer.Option(help="Class whose evidence is mapped", show_default="the positive class"),
        ] = None,
        scale: Annotated[
            str,
            typer.Option(help="Map colours: absolute (same 0-1 scale on every slide) or rank (within slide)"),
        ] = "absolute",
        mpp: opt.Mpp = None,
        config: opt.Config = None,
        device: opt.DeviceAuto = "auto",
        no_viewer: Annotated[bool, typer.Option("--no-viewer", help="Skip the HTML viewer")] = False,
    ):
        """Per-patch probability (calibrated), attention and inversion -> PNG, QuPath GeoJSON, OME-TIFF, HTML."""
        from .config import load_config
        from .device import resolve_device
        from .formats.scores import SCORE_NAMES
        from .pipeline.heatmap import HeatmapRequest, heatmap_slide

        if score not in SCORE_NAMES:
            raise WsiMilError(f"--score {score}: choose {', '.join(SCORE_NAMES)}")
        request = HeatmapRequest(
            model, fold, overlap, score, scale, target, not no_viewer, str(resolve_device(device))
        )
        summary = heatmap_slide(
            slide, run, out or Path("heatmaps"), features=features, work=work, request=request,
            cfg=load_config(config), mpp=mpp,
        )  # fmt: skip
        calibrated = summary["calibrated_probabilities"]
        say(
            f"{summary['slide']}: {summary['model']} predicts {summary['predicted']} "
            f"({summary['votes']} of {summary['folds']} fold(s), each at its validation threshold); "
            f"mean {summary['probabilities']}" + (f" (calibrated: {calibrated})" if calibrated else "")
        )
        say(
            f"  patch probabilities for {summary['target']}: calibration {summary['patch_calibration']}; "
            f"inversion steps kept per fold {summary['inversion_steps_kept']}"
            + (
                f"; inversion layer flat: {summary['flat_inversion_models']} of {summary['folds']} fold "
                "model(s) removed nearly every patch"
                if summary["inversion_layer_flat"]
                else ""
            )
        )
        for key in ("png", "geojson", "ome_tiff", "html", "scores", "csv"):
            if key in summary:
                say(f"  {key:8s} {summary[key]}")

    @app.command("evaluate-localization")
    @user_errors
    def evaluate_localization(
        scores: Annotated[Path, typer.Option(help="Folder of <slide>_scores.h5 from 'wsi-mil heatmap'")],
        annotations: Annotated[
            Path,
            typer.Option(
                help="Folder of <slide>.xml (ASAP), <slide>.geojson or a mask <slide>_mask.tif / .png / "
                ".npy of the tumor"
            ),
        ],
        out: Annotated[
            Optional[Path],
            typer.Option(
                "--out", "-o", help="JSON file for the results", show_default="SCORES/localization.json"
            ),
        ] = None,
        pos_frac: Annotated[float, typer.Option(help="Tumor fraction that makes a patch positive")] = 0.5,
    ):
        """Patch AUC, Camelyon16 FROC (its Evaluation_FROC.py) and slide AUC against annotations."""
        from .io import write_json
        from .localization.evaluate import evaluate_folder

        if not 0 < pos_frac <= 1:
            raise WsiMilError(f"--pos-frac {pos_frac}: the share of a patch's area in tumour, in (0, 1]")
        result = evaluate_folder(scores, annotations, pos_frac)
        print_localization(result)
        out = out or scores / "localization.json"
        write_json(out, result)
        say(f"-> {out}")

    @app.command()
    @user_errors
    def view(
        slide: Annotated[Path, typer.Argument(help="The slide file")],
        run: Annotated[
            Optional[Path],
            typer.Option(
                help="A crossval run: score the slide with it first", show_default="none: give --scores"
            ),
        ] = None,
        scores: Annotated[
            Optional[Path],
            typer.Option(
                help="A <slide>_scores.h5 from 'wsi-mil heatmap' (instead of --run)",
                show_default="none: give --run",
            ),
        ] = None,
        out: Annotated[Path, typer.Option("--out", "-o", help="Where --run writes the scores")] = Path(
            "heatmaps"
        ),
        model: Annotated[
            Optional[str], typer.Option(help="Which model of the run", show_default="the run's first")
        ] = None,
        target: Annotated[
            Optional[str],
            typer.Option(help="Class whose evidence is mapped", show_default="the positive class"),
        ] = None,
        scale: Annotated[str, typer.Option(help="absolute or rank (within slide)")] = "absolute",
        host: Annotated[
            str, typer.Option(help="Address to bind (keep 127.0.0.1 for patient data)")
        ] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="Port (0: any free one)")] = 8000,
        mpp: opt.Mpp = None,
        device: opt.DeviceAuto = "auto",
    ):
        """Review a slide with its scores in the browser: Deep Zoom to level-0 pixels, score layers."""
        from .device import resolve_device
        from .formats.scores import read_scores
        from .localization.scores import SCALES
        from .localization.server import Review, make_server
        from .wsi.readers import open_slide

        if not slide.exists():
            raise WsiMilError(f"{slide}: no such slide file; give the path of the slide to review")
        if (run is None) == (scores is None):
            raise WsiMilError("give --run RUN (score the slide now) or --scores FILE (scored before)")
        if scale not in SCALES:
            raise WsiMilError(f"--scale {scale}: use one of {', '.join(SCALES)}")
        if run is not None:
            from .pipeline.heatmap import HeatmapRequest, heatmap_slide

            request = HeatmapRequest(model, target=target, viewer=False, device=str(resolve_device(device)))
            summary = heatmap_slide(slide, run, out, request=request, mpp=mpp)
            scores = Path(summary["scores"])
        patch_scores = read_scores(scores)
        with open_slide(slide, mpp) as s:
            title = f"{slide.name}: evidence for {patch_scores.target or 'the mapped class'}"
            server = make_server(Review(s, patch_scores, title, scale), host, port)
            say(f"serving {slide.name} at http://{host}:{server.server_address[1]}/  (Ctrl-C to stop)")
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                pass
            finally:
                server.server_close()
