"""``sdo train digits | digit-clip | student``: retrain an embedded model into a fresh folder (the shipped weights
only with ``--replace-shipped``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..checks import UsageError
from .options import Parser, folder, non_negative_int, output_folder, positive_int

__all__ = ["add_train_parsers", "run_train", "train_output"]


def add_train_parsers(sub) -> None:
    """Add ``train`` and its three models to the ``sdo`` command's subparsers."""
    train = sub.add_parser("train", help="retrain an embedded model", description="Retrain an embedded model.")
    train_sub = train.add_subparsers(dest="model", required=True, parser_class=Parser)

    def model_parser(name: str, help: str, description: str) -> argparse.ArgumentParser:
        parser = train_sub.add_parser(name, help=help, description=description)
        parser.add_argument("--output", type=folder, default=None,
                            help="folder (default: a fresh sdo-train-<model>-<time>); never the shipped weights")
        parser.add_argument("--replace-shipped", action="store_true",
                            help="write into the installed package's weights folder, replacing the shipped model")
        parser.add_argument("--overwrite", action="store_true",
                            help="write into an --output that is not empty (files of the same names are replaced)")
        parser.add_argument("--seed", type=non_negative_int, default=0, help="seed (default 0)")
        parser.add_argument("--no-progress", action="store_true", help="no progress bars")
        return parser

    digits = model_parser("digits", help="the digits DDPM and classifier (scikit-learn's digits)",
                          description="Train the class-conditional DDPM and the classifier on scikit-learn's digits "
                          "and write the weights and the measured figures (digits_card.json).")
    digits.add_argument("--unet-steps", type=positive_int, default=None, help="DDPM optimizer steps")
    digits.add_argument("--classifier-epochs", type=positive_int, default=None, help="classifier epochs")
    digits.add_argument("--eval-samples", type=positive_int, default=None, help="samples for the quality figure")
    digit_clip = model_parser("digit-clip", help="the image-text model of the embedded text-guided edit",
                              description="Train the digits image tower and the projection of the frozen MiniLM text "
                              "tower contrastively on captioned digits; write digit_clip.safetensors and "
                              "digit_clip_card.json (held-out retrieval).")
    digit_clip.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default 1500)")
    student = model_parser("student", help="the few-step student of the digits DDPM (ShortFT's shortcut)",
                           description="Distill the few-step student from the digits DDPM's 50-step DDIM trajectories; "
                           "write digits_student.safetensors and digits_student_card.json (its trajectory error "
                           "against the teacher at the segment boundaries).")
    student.add_argument("--train-steps", type=positive_int, default=None, help="optimizer steps (default 2000)")
    student.add_argument("--trajectories", type=positive_int, default=None, help="teacher trajectories (default 2048)")


def train_output(args) -> Path:
    """Where ``sdo train`` writes: a fresh folder, ``--output``, or the shipped weights only when asked."""
    from ..embedded import weights_dir

    shipped = Path(str(weights_dir()))
    if args.replace_shipped:
        if args.output is not None:
            raise UsageError("give --output or --replace-shipped, not both")
        return shipped
    if args.output is not None and args.output.resolve() == shipped.resolve():
        raise UsageError(f"{args.output} is the package's shipped weights folder: "
                         "pass --replace-shipped to replace them")
    return output_folder(args, f"sdo-train-{args.model}")


def run_train(args) -> None:
    output = train_output(args)
    if args.model == "student":
        from ..embedded.student import StudentConfig, train_student

        cfg = StudentConfig(seed=args.seed)
        _set_given(cfg, args, ("train_steps", "trajectories"))
        card = train_student(output, cfg, progress=not args.no_progress)
        print(json.dumps({k: card[k] for k in ("held_out", "seconds")}, indent=2))
        print(f"wrote digits_student.safetensors and digits_student_card.json to {output}")
    elif args.model == "digit-clip":
        from ..embedded.digit_clip import DigitCLIPConfig, train_digit_clip

        cfg = DigitCLIPConfig(seed=args.seed)
        _set_given(cfg, args, ("steps",))
        _, card = train_digit_clip(output, cfg, progress=not args.no_progress)
        print(json.dumps({k: card[k] for k in ("held_out", "seconds")}, indent=2))
        print(f"wrote digit_clip.safetensors and digit_clip_card.json to {output}")
    else:
        from ..embedded.digits import TrainConfig, train_digits

        cfg = TrainConfig(seed=args.seed)
        _set_given(cfg, args, ("unet_steps", "classifier_epochs", "eval_samples"))
        card = train_digits(output, cfg, progress=not args.no_progress)
        print(json.dumps({k: card[k] for k in ("classifier", "samples", "seconds")}, indent=2))
        print(f"wrote the weights and digits_card.json to {output}")


def _set_given(cfg, args, names) -> None:
    """The options given on the command line, onto the training config (the others keep its defaults)."""
    for name in names:
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
