"""The side-by-side comparison as data, text, markdown, JSON and a PNG bar chart."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqfast.profile._measure import GROUPS, Measurement, OpRow

PROVIDERS = ("torch", "seqfast")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f}"


def _ratio(a: float, b: float) -> str:
    if b == 0:
        return "-" if a == 0 else "inf"
    return f"{a / b:.2f}x"


@dataclass
class Comparison:
    """torch against seqfast on one workload.

    ``torch`` / ``seqfast``: each one's :class:`Measurement` (``step_s`` median step time in seconds,
    ``peak_memory_bytes``, ``ops``: per-op self time per step). ``groups()``: per group (attention, ctc,
    matmul, softmax, other) the self time of each and the ratio torch / seqfast. On CUDA the op times are
    the GPU kernels' (self device time); on CPU the ops' self CPU time. ``files``: what was written.
    """

    name: str
    description: str
    device: str
    where: str
    torch: Measurement
    seqfast: Measurement
    top: int = 10
    notes: list[str] = field(default_factory=list)
    kernels: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def measurement(self, provider: str) -> Measurement:
        return self.torch if provider == "torch" else self.seqfast

    def groups(self) -> list[dict[str, Any]]:
        t, s = self.torch.group_s(self.device), self.seqfast.group_s(self.device)
        return [{"group": g, "torch_s": t[g], "seqfast_s": s[g], "ratio": (t[g] / s[g]) if s[g] else None}
                for g in GROUPS]

    def top_ops(self, provider: str) -> list[OpRow]:
        ops = sorted(self.measurement(provider).ops, key=lambda o: -o.time_s(self.device))
        return ops[: self.top]

    def summary_rows(self) -> list[tuple[str, str, str, str]]:
        """(what, torch, seqfast, torch / seqfast) rows: step time, peak memory, then each group."""
        t, s = self.torch, self.seqfast
        rows = [("step time, median (ms)", _ms(t.step_s), _ms(s.step_s), _ratio(t.step_s, s.step_s)),
                ("peak memory (MiB)", _mib(t.peak_memory_bytes), _mib(s.peak_memory_bytes),
                 _ratio(t.peak_memory_bytes, s.peak_memory_bytes))]
        unit = "GPU" if self.device == "cuda" else "CPU"
        for g in self.groups():
            rows.append((f"{g['group']}, self {unit} ms/step", _ms(g["torch_s"]), _ms(g["seqfast_s"]),
                         _ratio(g["torch_s"], g["seqfast_s"])))
        return rows

    def _op_rows(self) -> list[tuple[str, ...]]:
        tops = {p: self.top_ops(p) for p in PROVIDERS}
        rows = []
        for i in range(max(len(v) for v in tops.values())):
            row: list[str] = [str(i + 1)]
            for p in PROVIDERS:
                if i < len(tops[p]):
                    op = tops[p][i]
                    row += [op.name, op.group, _ms(op.time_s(self.device)), f"{op.calls:g}"]
                else:
                    row += ["", "", "", ""]
            rows.append(tuple(row))
        return rows

    def _header(self) -> str:
        return f"{self.name}: {self.description}\n{self.where}"

    def to_text(self) -> str:
        """The table for a terminal."""
        unit = "GPU" if self.device == "cuda" else "CPU"
        lines = [self._header(), ""]
        lines += _columns([("", "torch", "seqfast", "torch/seqfast"), *self.summary_rows()])
        lines += ["", f"top ops by self {unit} time per step (ms), calls per step"]
        head = ("#", "torch op", "group", "ms", "calls", "seqfast op", "group", "ms", "calls")
        lines += _columns([head, *(tuple(_clip(c) for c in r) for r in self._op_rows())])
        lines += self._kernel_lines() + [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        unit = "GPU" if self.device == "cuda" else "CPU"
        lines = [f"## {self.name}", "", self.description, "", f"Measured on: {self.where}", ""]
        lines += _md([("", "torch", "seqfast", "torch / seqfast"), *self.summary_rows()])
        lines += ["", f"Top ops by self {unit} time per step (ms; calls per step):", ""]
        head = ("#", "torch op", "group", "ms", "calls", "seqfast op", "group", "ms", "calls")
        lines += _md([head, *(tuple(f"`{c}`" if j in (1, 5) and c else c for j, c in enumerate(r))
                              for r in self._op_rows())])
        if self.kernels:
            lines += ["", "Triton kernels that ran:", ""]
            keys = list(self.kernels[0])
            lines += _md([tuple(keys), *(tuple(str(k.get(c, "")) for c in keys) for k in self.kernels)])
        lines += [f"\nNote: {n}" for n in self.notes]
        if self.files:
            lines += ["", "Files: " + ", ".join(f"`{Path(v).name}`" for v in self.files.values())]
        return "\n".join(lines) + "\n"

    def _kernel_lines(self) -> list[str]:
        if not self.kernels:
            return []
        keys = list(self.kernels[0])
        return ["", "Triton kernels that ran"] + _columns([tuple(keys), *(tuple(str(k.get(c, "")) for c in keys)
                                                                        for k in self.kernels)])

    def to_dict(self) -> dict[str, Any]:
        def meas(m: Measurement) -> dict[str, Any]:
            return {"step_s": m.step_s, "step_times_s": m.step_times_s, "peak_memory_bytes": m.peak_memory_bytes,
                    "trace": m.trace, "ops": [vars(o) for o in sorted(m.ops, key=lambda o: -o.time_s(self.device))]}

        return {"name": self.name, "description": self.description, "device": self.device, "where": self.where,
                "torch": meas(self.torch), "seqfast": meas(self.seqfast), "groups": self.groups(),
                "step_ratio": self.torch.step_s / self.seqfast.step_s if self.seqfast.step_s else None,
                "kernels": self.kernels, "notes": self.notes, "files": self.files}

    def write(self, out_dir: str | Path) -> dict[str, str]:
        """Write ``<name>.md``, ``<name>.json`` and ``<name>.groups.png`` into ``out_dir`` (the traces are
        written while profiling); returns every file of the comparison by kind."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.files["markdown"] = str(out / f"{self.name}.md")
        self.files["json"] = str(out / f"{self.name}.json")
        self.files["png"] = str(out / f"{self.name}.groups.png")
        self.plot(self.files["png"])
        Path(self.files["markdown"]).write_text(self.to_markdown())
        Path(self.files["json"]).write_text(json.dumps(self.to_dict(), indent=1))
        return self.files

    def plot(self, path: str | Path) -> None:
        """A PNG bar chart: self time per group and step, torch against seqfast."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups = self.groups()
        fig, ax = plt.subplots(figsize=(7, 3.6))
        xs = range(len(groups))
        width = 0.38
        for k, (provider, colour) in enumerate((("torch", "#7f7f7f"), ("seqfast", "#1f77b4"))):
            vals = [g[f"{provider}_s"] * 1e3 for g in groups]
            bars = ax.bar([x + (k - 0.5) * width for x in xs], vals, width, label=provider, color=colour)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(list(xs), [g["group"] for g in groups])
        unit = "GPU" if self.device == "cuda" else "CPU"
        ax.set_ylabel(f"self {unit} time per step (ms)")
        ax.set_title(f"{self.name}: step {_ms(self.torch.step_s)} ms (torch) vs {_ms(self.seqfast.step_s)} ms "
                     f"(seqfast)", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 or not _numeric(c) else c.rjust(w) for i, (c, w) in
                      enumerate(zip(r, widths))).rstrip() for r in rows]


def _numeric(text: str) -> bool:
    return text.replace(".", "", 1).replace("x", "", 1).isdigit() or text in ("-", "inf")


def _md(rows: list[tuple[str, ...]]) -> list[str]:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]]
    return out
