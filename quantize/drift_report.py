"""Showing a drift report: the one-screen table (rich), the Markdown summary for CI logs, the plot.

All three read the report dict that `drift.measure` returns, and the gate's `Check`s when a baseline
was given; the rows come from one table (`summary_rows`) so the terminal and the Markdown agree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .drift import THRESHOLDS, Check, DriftUsageError, fmt_number, fmt_value


def _pct(x: float) -> str:
    return fmt_value(x, "%")


def _ref_vs_model(pair: dict, fmt=lambda v: f"{v:.2f}") -> str:
    return f"{fmt(pair['reference'])} -> {fmt(pair['model'])}"


def summary_rows(report: dict, checks: Sequence[Check] = ()) -> list[tuple[str, str, str, str]]:
    """(metric, value, threshold, status) rows: every headline figure, and its bound when the baseline
    sets one (status "ok" or "FAIL"; "" when unbounded)."""
    by_name = {c.name: c for c in checks}
    qualifier = {"max_task_accuracy_drop": "drop "}

    def bound(*names: str) -> tuple[str, str]:
        cs = [by_name[n] for n in names if n in by_name]
        if not cs:
            return "", ""
        text = "; ".join(f"{qualifier.get(c.name, '')}{c.op} {fmt_value(c.limit, THRESHOLDS[c.name].unit)}" for c in cs)
        return text, "ok" if all(c.ok for c in cs) else "FAIL"

    tf, fr, ps, task = report["teacher_forced"], report["free_running"], report["prompt_side"], report["task"]
    rows = []
    for stat in ("mean", "median", "p99", "max"):
        rows.append((f"KL {stat} (teacher forced)", fmt_number(tf["kl"][stat]), *bound(f"max_{stat}_kl")))
    rows.append(("top-1 agreement", _pct(tf["top1"]), *bound("min_top1")))
    rows.append(("accept-set Jaccard", f"{_pct(tf['accept_jaccard'])} ({_pct(tf['accept_sets_equal'])} identical)",
                 *bound("min_accept_jaccard")))
    rows.append(("final canvas token agreement", f"{_pct(fr['token_agreement'])} "
                 f"({_pct(fr['canvases_identical'])} canvases identical)", *bound("min_token_agreement")))
    rows.append(("steps per canvas", f"{_ref_vs_model({k: v['mean'] for k, v in fr['steps'].items()})} "
                 f"({fr['steps_increase_pct']:+.1f} %)", *bound("max_steps_increase_pct")))
    rows.append(("tokens per forward", _ref_vs_model(fr["tokens_per_forward"]), "", ""))
    if ps is not None:
        rows.append(("prompt-side KL mean (top-1)", f"{fmt_number(ps['kl']['mean'])} ({_pct(ps['top1'])})",
                     *bound("max_prompt_mean_kl")))
    if task is not None:
        rows.append((f"task accuracy ({task['name']}, {task['puzzles']})",
                     _ref_vs_model({"reference": task["reference_accuracy"], "model": task["model_accuracy"]}, _pct),
                     *bound("min_task_accuracy", "max_task_accuracy_drop")))
    return rows


def per_step_rows(report: dict, limit: int = 12) -> list[tuple[str, ...]]:
    """(step, canvases, mean KL, p99 KL, top-1, Jaccard) for the first `limit` step indices."""
    return [(str(s["step"]), str(s["canvases"]), fmt_number(s["kl"]["mean"]), fmt_number(s["kl"]["p99"]), _pct(s["top1"]),
             _pct(s["accept_jaccard"])) for s in report["teacher_forced"]["per_step"][:limit]]


def title(report: dict) -> str:
    s = report["settings"]
    return (f"{report['model']['file']} vs {report['reference']['file']}: {s['canvases']} canvases, "
            f"seed {s['seed']}, up to {s['sampler']['max_steps']} steps")


def verdict(checks: Sequence[Check]) -> str:
    failed = [c for c in checks if not c.ok]
    if not checks:
        return "no baseline: nothing checked"
    if failed:
        return "drift gate FAILED: " + "; ".join(c.describe() for c in failed)
    return f"drift gate passed ({len(checks)} thresholds)"


def print_summary(report: dict, checks: Sequence[Check], console) -> None:
    """The one-screen summary on a rich console."""
    from rich.table import Table

    table = Table(title=title(report), title_justify="left")
    for name, justify in (("metric", "left"), ("value", "right"), ("threshold", "right"), ("", "left")):
        table.add_column(name, justify=justify)
    for metric, value, limit, status in summary_rows(report, checks):
        style = {"ok": "green", "FAIL": "bold red"}.get(status, "")
        table.add_row(metric, value, limit, f"[{style}]{status}[/]" if style else status)
    console.print(table)
    steps = Table(title="teacher forced, per denoising step", title_justify="left")
    for name in ("step", "canvases", "mean KL", "p99 KL", "top-1", "Jaccard"):
        steps.add_column(name, justify="right")
    for row in per_step_rows(report):
        steps.add_row(*row)
    console.print(steps)
    failed = any(not c.ok for c in checks)
    console.print(f"[{'bold red' if failed else 'green' if checks else 'dim'}]{verdict(checks)}[/]", highlight=False)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def markdown(report: dict, checks: Sequence[Check]) -> str:
    """The Markdown summary: headline table, verdict, per-step and per-position-bucket tables."""
    tf = report["teacher_forced"]
    lines = [f"### Quantization drift: {title(report)}", ""]
    lines += _md_table(("metric", "value", "threshold", "status"), summary_rows(report, checks),
                       (False, True, True, False))
    lines += ["", f"**{verdict(checks)}**", "", "Teacher forced, per denoising step:", ""]
    lines += _md_table(("step", "canvases", "mean KL", "p99 KL", "top-1", "Jaccard"),
                       per_step_rows(report, limit=len(tf["per_step"])), (True,) * 6)
    lines += ["", "Teacher forced, per canvas position bucket:", ""]
    lines += _md_table(("positions", "mean KL", "p99 KL", "max KL", "top-1"),
                       [(f"{b['positions'][0]}-{b['positions'][1]}", fmt_number(b["kl"]["mean"]),
                         fmt_number(b["kl"]["p99"]), fmt_number(b["kl"]["max"]), _pct(b["top1"]))
                        for b in tf["per_position_bucket"]], (True,) * 5)
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str | os.PathLike[str]) -> Path:
    """KL per denoising step (mean and p99) and mean KL per canvas position, as an image."""
    try:
        import matplotlib
    except ImportError:
        raise DriftUsageError("--plot needs matplotlib: pip install 'pydgemma[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tf = report["teacher_forced"]
    fig, (by_step, by_pos) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    steps = [s["step"] for s in tf["per_step"]]
    for stat, style in (("mean", "o-"), ("p99", "s--")):
        by_step.plot(steps, [max(s["kl"][stat], 1e-12) for s in tf["per_step"]], style, label=f"{stat} KL")
    by_step.set(yscale="log", xlabel="denoising step", ylabel="KL(ref || model)", title="per step")
    by_step.legend()
    pos_kl = tf["per_position_mean_kl"]
    by_pos.bar(range(len(pos_kl)), [max(v, 1e-12) for v in pos_kl])
    by_pos.set(yscale="log", xlabel="canvas position", ylabel="mean KL", title="per canvas position")
    fig.suptitle(title(report), fontsize=9)
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
