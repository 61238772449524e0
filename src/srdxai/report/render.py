"""``srdxai report``: a run directory's ``results.sqlite`` as ``report.html`` and ``report.md``.

The report is built once as a list of sections made of neutral blocks (text, tables, figures)
and then written twice: as one self-contained HTML file (inline CSS, figures as base64 PNG data
URIs) and as Markdown with its figures written to ``figures/`` next to it. Every file is written
to a temporary name and renamed, so a reader never sees half a report. Each registered
experiment writes its own section (``Experiment.section``; blocks in ``blocks.py``); a section
whose experiment has no rows says "not run" instead of failing, and experiments in the database
that no registered experiment knows still get a generic table.
"""

from __future__ import annotations

import base64
import errno
import html
import json
import re
from collections.abc import Sequence
from pathlib import Path

from srdxai.errors import RunDirectoryError
from srdxai.experiments.store import check_writable, merged_path
from srdxai.report import tables
from srdxai.report.blocks import (
    Code,
    Figure,
    FigureNames,
    Html,
    Section,
    Table,
    Text,
    generic_section,
    not_run,
    slug,
)
from srdxai.report.figures import write_atomic
from srdxai.report.tables import RunInfo

__all__ = ["build_report"]


# --- sections ---------------------------------------------------------------------------------

def _header(info: RunInfo, contents: list[Section]) -> Section:
    blocks: list = [
        Text(f"Results database: {info.path}"),
        Text(f"Config hash: {info.config_hash} · code version: {info.code_version} · "
             f"created: {info.created}"),
        Text(f"Rows: {info.n_results} results, {info.n_curves} curves, {info.n_artifacts} "
             f"artifacts."),
    ]
    others = [v for v in info.row_code_versions if v != info.code_version]
    if others:
        blocks.append(Text(f"Warning: result rows come from other code versions too: "
                           f"{', '.join(info.row_code_versions)}."))
    if info.rows_per_experiment:
        blocks.append(Table("Result rows per experiment", ["experiment", "rows"],
                            [[(e, False), (str(n), False)]
                             for e, n in info.rows_per_experiment.items()]))
    if info.config is not None:
        blocks += [Text("Configuration:"),
                   Code(json.dumps(info.config, indent=2, sort_keys=True), "json")]
    elif info.config_text:
        # Shown as a JSON string: exact, and safe to put in either report whatever it holds.
        blocks += [Text("Configuration (stored text that is not a JSON object):"),
                   Code(json.dumps(info.config_text), "json")]
    else:
        blocks += [Text("Configuration:"), Code("(no configuration stored)")]
    blocks.append(Text(
        "Cells are the mean over samples ± the half-width of its 95 % confidence interval "
        "(Student's t with n−1 degrees of freedom); NaN/NULL values are left out and counted "
        "in the notes; n=1 has no interval. Bold marks the best method per model and metric "
        "(↑ higher is better, ↓ lower is better; ties are all bold; metrics without an arrow "
        "have no declared direction and no mark)."))
    blocks.append(Text("Sections: " + "; ".join(
        f"{s.title}{'' if s.ran else ' (not run)'}" for s in contents) + "."))
    return Section("Run", "run", blocks)


def _sections(db: Path, info: RunInfo) -> list[Section]:
    """Every registered experiment's section in report order (experiments sharing a group
    become subsections of one section), then a generic section for each experiment in the
    database that no registered experiment knows. Experiments not run are listed as such,
    except in a run of optional experiments only."""
    from srdxai.experiments import EXPERIMENTS, ReportInputs, experiment_names

    experiment_names()  # registers the shipped experiments
    report = ReportInputs(db, info.config, FigureNames())
    body: list[Section] = []
    groups: dict[tuple[str, str], Section] = {}
    suite_ran = optional_ran = False
    for exp in sorted(EXPERIMENTS.values(), key=lambda e: e.report_position):
        section = exp.section(report)
        if exp.optional:
            optional_ran |= section.ran
        else:
            suite_ran |= section.ran
        if exp.optional and not section.ran:
            continue  # run only when asked for: no "not run" section for it
        if exp.group is None:
            body.append(section)
        elif exp.group in groups:
            groups[exp.group].blocks.append(section)
        else:
            groups[exp.group] = Section(exp.group[0], exp.group[1], [section])
            body.append(groups[exp.group])
    for title, anchor in groups:
        group = groups[(title, anchor)]
        if not any(isinstance(s, Section) and s.ran for s in group.blocks):
            members = [e.name for e in sorted(EXPERIMENTS.values(),
                                              key=lambda e: e.report_position)
                       if e.group == (title, anchor)]
            body[body.index(group)] = not_run(title, anchor, members)
    if optional_ran and not suite_ran:
        # a run of only optional experiments (your model and data): the paper's sections
        # would all read "not run", which says nothing about that run
        body = [section for section in body if section.ran]
    for experiment in tables.experiments(db):
        if experiment not in EXPERIMENTS:
            body.append(generic_section(report, experiment, f"Experiment '{experiment}'",
                                        f"experiment-{slug(experiment)}"))
    return [_header(info, body)] + body


# --- writers ----------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 80em; color: #222;
       padding: 0 1em; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #aaa; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
caption { text-align: left; font-weight: 600; padding: 0.3em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f0f0f0; }
tbody tr:nth-child(even) { background: #fafafa; }
pre { background: #f5f5f5; padding: 0.8em; overflow-x: auto; }
.scroll { overflow-x: auto; max-width: 100%; }
.note { color: #555; font-size: 0.85em; margin: 0.2em 0; }
.notrun { color: #999; font-style: italic; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.85em; }
"""


def _html_block(block: Text | Code | Table | Figure | Html | Section, level: int) -> list[str]:
    e = html.escape
    if isinstance(block, Section):
        out = [f'<section id="{e(block.anchor)}">', f"<h{level}>{e(block.title)}</h{level}>"]
        for b in block.blocks:
            out += _html_block(b, level + 1)
        return out + ["</section>"]
    if isinstance(block, Text):
        cls = ' class="notrun"' if block.text.startswith("Not run") else ""
        return [f"<p{cls}>{e(block.text)}</p>"]
    if isinstance(block, Code):
        return [f"<pre>{e(block.text)}</pre>"]
    if isinstance(block, Html):
        return [f'<div class="fragment"><p><b>{e(block.title)}</b></p>', block.html, "</div>"]
    if isinstance(block, Figure):
        data = base64.b64encode(block.png).decode("ascii")
        return [f'<figure><img src="data:image/png;base64,{data}" alt="{e(block.title)}">'
                f"<figcaption>{e(block.title)}</figcaption></figure>"]
    head = "".join(f"<th>{e(h)}</th>" for h in block.header)
    body = ["<tr>" + "".join(f"<td><b>{e(t)}</b></td>" if bold else f"<td>{e(t)}</td>"
                             for t, bold in row) + "</tr>" for row in block.rows]
    # wide tables (19 methods x many metrics) scroll sideways inside the page, never cut off
    return ([f'<div class="scroll"><table><caption>{e(block.title)}</caption><thead><tr>'
             f"{head}</tr></thead><tbody>"] + body + ["</tbody></table></div>"]
            + [f'<p class="note">{e(n)}</p>' for n in block.notes])


def _html(sections: list[Section]) -> str:
    contents = "".join(
        f'<li><a href="#{html.escape(s.anchor)}">{html.escape(s.title)}</a>'
        f"{'' if s.ran else ' (not run)'}</li>" for s in sections)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>srdxai benchmark report</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>srdxai benchmark report</h1>", f"<nav><ul>{contents}</ul></nav>"]
    for s in sections:
        parts += _html_block(s, 2)
    return "\n".join(parts + ["</body></html>", ""])


# Markdown: everything the report shows is literal text (most of it comes from the database:
# names of experiments, models, methods, metrics and artifacts, the configuration), so a name
# can neither break a table nor add markup, HTML or links. CommonMark backslash escapes cover
# the markup; HTML's three characters become entities (which also defeats <autolinks>).
_MD_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")  # newlines end a table row or line
_MD_ALWAYS = re.compile(r"[\\`*#|~$@]")
_MD_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")  # intraword _ is no markup
_MD_LINK_END = re.compile(r"\](?=[(\[:])")  # ](url), ][ref], [ref]: definitions
_MD_AUTOLINK = re.compile(r"(?i)(?<=:)//|(?<=\bwww)\.")  # GitHub links bare URLs
_MD_BLOCK_START = re.compile(r"([-+=])|\d{1,9}([.)])(?=\s|$)")  # a list, rule or setext line


def _md_text(text: str, brackets: bool = False) -> str:
    """``text`` as literal Markdown inline text on one line; ``brackets``: inside ``[...]``
    (an image's text), where every bracket must be escaped to keep the brackets balanced."""
    text = html.escape(_MD_CONTROL.sub(" ", str(text)).strip(), quote=False)
    text = _MD_ALWAYS.sub(lambda m: "\\" + m.group(), text)
    text = _MD_UNDERSCORE.sub(r"\\_", text)
    if brackets:
        text = text.replace("[", "\\[").replace("]", "\\]")
    else:
        text = _MD_LINK_END.sub(r"\\]", text)
    return _MD_AUTOLINK.sub(lambda m: "\\" + m.group(), text)


def _md_line(text: str) -> str:
    """``text`` as a paragraph line: also nothing at its start may open a block."""
    out = _md_text(text)
    start = _MD_BLOCK_START.match(out)
    if start is None:
        return out
    if start.group(1):
        return "\\" + out
    cut = start.end() - 1
    return out[:cut] + "\\" + out[cut:]


def _md_code(block: Code) -> list[str]:
    text = block.text
    if block.lang == "json":
        # In JSON these characters occur only inside strings, where the \u escapes mean the
        # same: the configuration stays valid, equal JSON with no HTML and no fence in it.
        text = text.translate({ord(c): f"\\u{ord(c):04x}" for c in "<>&`"})
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + block.lang, text, fence, ""]


def _md_block(block: Text | Code | Table | Figure | Html | Section, level: int) -> list[str]:
    if isinstance(block, Section):
        out = ["#" * level + " " + _md_text(block.title), ""]
        for b in block.blocks:
            out += _md_block(b, level + 1)
        return out
    if isinstance(block, Text):
        if block.text.startswith("Not run"):
            return [f"_{_md_text(block.text)}_", ""]
        return [_md_line(block.text), ""]
    if isinstance(block, Code):
        return _md_code(block)
    if isinstance(block, Html):  # raw HTML: the fragment has no blank line to end it
        return [f"**{_md_text(block.title)}**", "", block.html, ""]
    if isinstance(block, Figure):  # the file name is a slug: [A-Za-z0-9._-]
        return [f"![{_md_text(block.title, brackets=True)}](figures/{block.filename})", ""]
    out = [f"**{_md_text(block.title)}**", "",
           "| " + " | ".join(_md_text(h) for h in block.header) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(block.header) - 1)) + "|"]
    for row in block.rows:
        out.append("| " + " | ".join(f"**{_md_text(t)}**" if bold else _md_text(t)
                                     for t, bold in row) + " |")
    out.append("")
    for note in block.notes:
        out += [_md_line(note), ""]
    return out


def _markdown(sections: list[Section]) -> str:
    lines = ["# srdxai benchmark report", ""]
    for s in sections:
        lines += _md_block(s, 2)
    return "\n".join(lines)


def _figures(blocks: Sequence) -> list[Figure]:
    out = []
    for b in blocks:
        if isinstance(b, Section):
            out += _figures(b.blocks)
        elif isinstance(b, Figure):
            out.append(b)
    return out


#: errno values meaning "cannot write here" (as opposed to a bug or a vanished file)
_NO_WRITE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})


def _cannot_write(target: Path, run_dir: Path, exc: OSError) -> RunDirectoryError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = "free some space and run `srdxai report` again"
    else:
        todo = (f"make {target.parent} writable (`chmod u+w {target.parent}`), or copy "
                f"{run_dir} somewhere writable and run `srdxai report` on the copy")
    return RunDirectoryError(f"cannot write the report file {target}: "
                             f"{exc.strerror or exc}; {todo}. No report file is left "
                             "half-written.")


def _write_atomic(path: Path, data: bytes, run_dir: Path) -> None:
    try:
        write_atomic(path, lambda handle: handle.write(data))
    except OSError as exc:
        if exc.errno in _NO_WRITE:
            raise _cannot_write(path, run_dir, exc) from exc
        raise


def build_report(run_dir: Path) -> tuple[Path, Path]:
    """Write ``run_dir/report.html`` (self-contained) and ``run_dir/report.md`` (with its
    figures in ``run_dir/figures/``) from ``run_dir/results.sqlite``; returns both paths.

    Raises :class:`~srdxai.errors.InvalidInputError` when the database is missing, not a
    results database, or empty, saying what to run, and its subclass
    :class:`~srdxai.errors.RunDirectoryError` when the database is damaged or a report file
    cannot be written (naming the file; reports already there stay as they were).
    """
    run_dir = Path(run_dir)
    db = merged_path(run_dir)
    info = tables.run_info(db)
    # Before the figures are drawn: an unwritable run directory is one line, not lost work.
    check_writable(run_dir, f"write report.html, report.md and figures/ into {run_dir}")
    sections = _sections(db, info)
    figures = _figures(sections)
    if figures:
        try:
            (run_dir / "figures").mkdir(exist_ok=True)
        except OSError as exc:
            if exc.errno in _NO_WRITE:
                raise _cannot_write(run_dir / "figures", run_dir, exc) from exc
            raise
    for fig in figures:
        _write_atomic(run_dir / "figures" / fig.filename, fig.png, run_dir)
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    _write_atomic(md_path, _markdown(sections).encode("utf-8"), run_dir)
    _write_atomic(html_path, _html(sections).encode("utf-8"), run_dir)
    return html_path, md_path
