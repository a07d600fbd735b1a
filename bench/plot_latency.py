#!/usr/bin/env python3
"""Propagation-latency CDFs of gwsync against alfred, on a log time axis,
as an SVG, from the JSON lines of `cargo bench --bench alfred -- --json`.

    python3 bench/plot_latency.py bench/results/alfred.jsonl bench/results/alfred-latency.svg

Python standard library only, so the figure regenerates anywhere. A write
that never reached every node (null in `latencies_ms`) keeps its curve below
1: the gap to the top is the share of writes lost for good.
"""

import json
import math
import sys

PANELS = [
    ("lossless, 10 entries", 0, "10 entries"),
    ("10 % loss, 10 entries", 10, "10 entries"),
    ("10 % loss, 1,000 entries of 1 KB", 10, "1000 x 1 KB"),
]
COLOURS = {"gwsync": "#1f77b4", "alfred": "#d95f02"}
DASHES = ["", "6,3", "2,2", "8,3,2,3"]
X_MIN_MS, X_MAX_MS = 1.0, 100_000.0
PANEL_W, PANEL_H = 300, 230
LEFT, TOP, GAP = 55, 40, 40


def x_of(ms):
    ms = min(max(ms, X_MIN_MS), X_MAX_MS)
    span = math.log10(X_MAX_MS) - math.log10(X_MIN_MS)
    return (math.log10(ms) - math.log10(X_MIN_MS)) / span * PANEL_W


def y_of(fraction):
    return PANEL_H - fraction * PANEL_H


def cdf_path(samples):
    """Step path of the fraction of writes done by each time."""
    total = len(samples)
    done = sorted(ms for ms in samples if ms is not None)
    points = [(x_of(X_MIN_MS), y_of(0.0))]
    for count, ms in enumerate(done, start=1):
        x = x_of(ms)
        points.append((x, points[-1][1]))
        points.append((x, y_of(count / total)))
    points.append((x_of(X_MAX_MS), points[-1][1]))
    return "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in points)


def panel(rows, title, loss, case, offset_x, sizes):
    out = [f'<g transform="translate({offset_x},{TOP})">']
    out.append(f'<text x="{PANEL_W / 2}" y="-12" text-anchor="middle" font-weight="bold">{title}</text>')
    out.append(f'<rect width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#999"/>')
    for exponent in range(0, 6):
        x = x_of(10.0**exponent)
        label = ["1 ms", "10 ms", "100 ms", "1 s", "10 s", "100 s"][exponent]
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{PANEL_H}" stroke="#ddd"/>')
        out.append(f'<text x="{x:.1f}" y="{PANEL_H + 15}" text-anchor="middle" font-size="10">{label}</text>')
    for tenth in range(0, 11, 2):
        y = y_of(tenth / 10)
        out.append(f'<line x1="0" x2="{PANEL_W}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        if offset_x == LEFT:
            out.append(f'<text x="-6" y="{y + 3:.1f}" text-anchor="end" font-size="10">{tenth / 10:.1f}</text>')
    for system in ("alfred", "gwsync"):
        for index, n in enumerate(sizes):
            row = next(
                (r for r in rows if r["system"] == system and r["n"] == n and r["loss"] == loss and r["case"] == case),
                None,
            )
            if row is None or not row["latencies_ms"]:
                continue
            dash = DASHES[index % len(DASHES)]
            out.append(
                f'<path d="{cdf_path(row["latencies_ms"])}" fill="none" stroke="{COLOURS[system]}" '
                f'stroke-width="1.8" stroke-dasharray="{dash}"><title>{system} N={n}</title></path>'
            )
    never = sorted(
        r["n"]
        for r in rows
        if r["loss"] == loss and r["case"] == case and r["latencies_ms"] and all(ms is None for ms in r["latencies_ms"])
        and r["system"] == "alfred"
    )
    if never:
        sizes_text = ", ".join(str(n) for n in never)
        out.append(
            f'<text x="{PANEL_W / 2}" y="{PANEL_H - 22}" text-anchor="middle" font-size="11" fill="{COLOURS["alfred"]}">'
            f"alfred (N = {sizes_text}): no write reached all nodes</text>"
        )
    out.append("</g>")
    return out


def main():
    source, target = sys.argv[1], sys.argv[2]
    with open(source) as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    sizes = sorted({row["n"] for row in rows})
    width = LEFT + len(PANELS) * (PANEL_W + GAP) + 10
    height = TOP + PANEL_H + 95
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    for index, (title, loss, case) in enumerate(PANELS):
        svg += panel(rows, title, loss, case, LEFT + index * (PANEL_W + GAP), sizes)
    svg.append(
        f'<text transform="translate(14,{TOP + PANEL_H / 2}) rotate(-90)" text-anchor="middle">'
        "fraction of writes on every node</text>"
    )
    svg.append(
        f'<text x="{width / 2}" y="{TOP + PANEL_H + 35}" text-anchor="middle">'
        "time from a write on one gateway until every other gateway has it (log scale)</text>"
    )
    legend_y = TOP + PANEL_H + 60
    x = LEFT
    for system in ("gwsync", "alfred"):
        for index, n in enumerate(sizes):
            dash = DASHES[index % len(DASHES)]
            svg.append(
                f'<line x1="{x}" x2="{x + 28}" y1="{legend_y}" y2="{legend_y}" stroke="{COLOURS[system]}" '
                f'stroke-width="1.8" stroke-dasharray="{dash}"/>'
            )
            svg.append(f'<text x="{x + 34}" y="{legend_y + 4}">{system} N={n}</text>')
            x += 125
    svg.append("</svg>")
    with open(target, "w") as out:
        out.write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
