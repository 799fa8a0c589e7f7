"""`wsi-mil encoders` (patch and slide encoders) and `wsi-mil slide-embed`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .console import Out, Overwrite, RandomWeights, print_encoders, say, user_errors


def register(app: typer.Typer) -> None:
    @app.command()
    @user_errors
    def encoders():
        """The registered patch and slide encoders: embedding size, input, resolution, weights."""
        from .features.encoders import encoder_table
        from .features.foundation_specs import NOT_REGISTERED as PATCH_NOT_REGISTERED
        from .features.slide_encoders import slide_encoder_table
        from .features.slide_specs import NOT_REGISTERED

        print_encoders(encoder_table())
        say("Also: timm:<model name> and hf-hub:<repo> for any other timm model.")
        say("Not built here: " + "; ".join(f"{k}: {v}" for k, v in PATCH_NOT_REGISTERED.items()))
        print_encoders(slide_encoder_table(), slide=True)
        say("Not built here: " + "; ".join(f"{k}: {v}" for k, v in NOT_REGISTERED.items()))

    @app.command("slide-embed")
    @user_errors
    def slide_embed(
        features: Annotated[
            Path, typer.Option(help="Folder of <slide>.h5 patch features (features/<encoder>)")
        ],
        encoder: Annotated[
            str, typer.Option(help="Slide encoder: chief, feather, madeleine, mean-<patch encoder>, ...")
        ],
        out: Out,
        weights: Annotated[
            Optional[Path], typer.Option(help="Local slide encoder weights", show_default="the hub's")
        ] = None,
        random_weights: RandomWeights = False,
        overwrite: Overwrite = False,
    ):
        """One embedding per slide: OUT/<slide>.h5 (features [1, D]) for crossval --model linear-probe."""
        from rich.progress import Progress

        from .features.slide_encoders import create_slide_encoder
        from .pipeline.slide_embed import embed_slides

        enc = create_slide_encoder(encoder, weights, random_weights)
        with Progress(transient=True) as bar:
            task = bar.add_task(f"slide-embed {encoder}", total=None)
            summary = embed_slides(
                features, enc, out, overwrite, lambda i, n, _: bar.update(task, completed=i, total=n)
            )
        say(
            f"{summary['written']} slide(s) embedded, {summary['skipped']} already done -> {out} "
            f"({enc.info.dim}-d, {encoder} on {enc.info.patch_encoder} features, weights: {enc.info.weights})"
        )
