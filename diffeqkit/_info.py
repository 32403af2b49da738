"""`support_matrix()` and the `python -m diffeqkit info` report."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

from . import backends

__all__ = ["format_report", "info_report", "support_matrix"]


def support_matrix(*, installed_only: bool = True) -> dict[str, dict[str, Any]]:
    """The algs, sensealgs and devices each backend supports.

    Parameters
    ----------
    installed_only : bool, default True
        List only the backends whose packages are installed.

    Returns
    -------
    dict
        ``{backend: {"algs": [...], "sensealgs": [...], "devices": [...],
        "gradients": {sensealg: "discrete" | "continuous"}, "events": [...]}}``
        ("events": the sensealgs that differentiate a solve with
        ``events=[...]``; empty where the backend offers no events). "discrete": the
        sensealg differentiates the solver's own steps (the exact derivative of
        the computed solution); "continuous": it integrates sensitivity or
        adjoint ODEs under error control, converging to the derivative of the
        exact solution as the tolerances shrink.

    Examples
    --------
    >>> import diffeqkit as dk
    >>> "tsit5" in dk.support_matrix()["scipy"]["algs"]
    True
    """
    return {
        name: {
            "algs": list(spec.capabilities.algs),
            "sensealgs": list(spec.capabilities.sensealgs),
            "devices": list(spec.capabilities.devices),
            "gradients": {
                s: support.computes
                for s, support in spec.capabilities.sensealgs.items()
            },
            "events": list(spec.capabilities.events),
        }
        for name, spec in backends.SPECS.items()
        if not installed_only or backends.installed(name)
    }


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions(*dists: str) -> dict[str, str]:
    """Each distribution's installed version, or ``"not installed"`` (for reports
    and benchmark results)."""
    return {d: _version(d) for d in dists}


def info_report() -> dict[str, Any]:
    """Everything `info` prints, as data (also its ``--json`` output)."""
    from . import __version__

    report: dict[str, Any] = {
        "diffeqkit": __version__,
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "array-api-compat": _version("array-api-compat"),
        "backends": {},
    }
    for name, spec in backends.SPECS.items():
        entry: dict[str, Any] = {
            "installed": backends.installed(name),
            "versions": {req: _version(req) for req in spec.requires},
            "extra": f'pip install "diffeqkit[{spec.extra}]"',
        }
        if entry["installed"]:
            entry.update(backends.load(name).describe())
            entry["algs"] = list(spec.capabilities.algs)
            entry["sensealgs"] = list(spec.capabilities.sensealgs)
        report["backends"][name] = entry
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"diffeqkit {report['diffeqkit']} (Python {report['python']}, "
        f"numpy {report['numpy']}, array-api-compat {report['array-api-compat']})",
        "",
    ]
    for name, entry in report["backends"].items():
        versions = ", ".join(f"{k} {v}" for k, v in entry["versions"].items())
        if not entry["installed"]:
            lines.append(f"{name:<6} not installed ({versions}); {entry['extra']}")
            continue
        lines.append(f"{name:<6} {versions}")
        lines.append(f"       devices:   {', '.join(entry.get('devices', []))}")
        lines.append(f"       algs:      {', '.join(entry['algs'])}")
        lines.append(f"       sensealgs: {', '.join(entry['sensealgs']) or '-'}")
    return "\n".join(lines)


def support_table() -> str:
    """The support matrix as a Markdown table, generated from the registry (the
    README and the docs include it; a test keeps the README's copy current)."""
    from ._algs import ALGS

    specs = backends.SPECS
    kinds = {
        "fixed": "fixed step (`dt0` required)",
        "adaptive": "adaptive explicit (`adaptive=False`: constant steps)",
        "implicit": "implicit (stiff), Jacobians by AD or `prob.jac`",
    }

    def cell(items: list[str]) -> str:
        return ", ".join(f"`{x}`" for x in items) or "—"

    rows = [
        "| | " + " | ".join(specs) + " |",
        "| --- | " + " | ".join("---" for _ in specs) + " |",
    ]
    for kind, label in kinds.items():
        rows.append(
            f"| {label} | "
            + " | ".join(
                cell([a for a in s.capabilities.algs if ALGS[a].kind == kind])
                for s in specs.values()
            )
            + " |"
        )
    from ._sensealg import SENSEALGS

    for cls in SENSEALGS:
        entries = []
        for s in specs.values():
            support = s.capabilities.sensealgs.get(cls.name)
            if support is None:
                entries.append("—")
                continue
            text = support.computes
            if len(support.kinds) < len(kinds):
                text += " (" + ", ".join(support.kinds) + " algs)"
            entries.append(text)
        rows.append(f"| `{cls.name}` | " + " | ".join(entries) + " |")
    rows.append(
        "| devices | "
        + " | ".join(", ".join(s.capabilities.devices) for s in specs.values())
        + " |"
    )
    return "\n".join(rows)


def events_table() -> str:
    """Which sensealgs differentiate a solve with events on each backend, as a
    Markdown table generated from the registry (docs/events.md includes it)."""
    from ._sensealg import SENSEALGS

    specs = backends.SPECS
    rows = [
        "| sensealg | " + " | ".join(specs) + " |",
        "| --- | " + " | ".join("---" for _ in specs) + " |",
    ]
    for cls in SENSEALGS:
        cells = []
        for s in specs.values():
            if cls.name in s.capabilities.events:
                cells.append("yes")
            elif cls.name in s.capabilities.sensealgs and s.capabilities.events:
                cells.append("`UnsupportedError`")
            else:
                cells.append("—")
        rows.append(f"| `{cls.name}` | " + " | ".join(cells) + " |")
    plain = ["yes" if s.capabilities.events else "—" for s in specs.values()]
    rows.insert(2, "| solve with events | " + " | ".join(plain) + " |")
    return "\n".join(rows)
