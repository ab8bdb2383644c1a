"""Run PEFT's own LoRA tests against tilpass and write the figures to docs/compatibility.md.

    python compat/peft_suite/run.py full --write-docs   # both backends, every LoRA case (long)
    python compat/peft_suite/run.py report              # the table from the last runs' records
    python compat/peft_suite/run.py sample              # the fixed CI sample, tilpass only
    python compat/peft_suite/run.py make-sample         # pick the sample from a full run
    python compat/peft_suite/run.py vendor              # rebuild the sample's small archive

`full` keeps each backend's records in `$TILPASS_CACHE/peft-suite/results-<version>/`;
`--reuse-peft` takes PEFT's records from an earlier run (they change only with PEFT).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import sys
import tempfile
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import Selection, compare, table, top_errors
from suite import (
    CUSTOM,
    PEFT_VERSION,
    REPO,
    SAMPLE,
    VENDORED,
    Run,
    cache_dir,
    other_files,
    read_results,
    suite,
    unpack,
    vendor,
)

DOC = REPO / "docs" / "compatibility.md"
MARKERS = {
    "custom": ("<!-- peft-suite:begin -->", "<!-- peft-suite:end -->"),
    "others": ("<!-- peft-suite-others:begin -->", "<!-- peft-suite-others:end -->"),
}
"""Where in DOC each selection's measured figures go."""
TITLES = {"others": "other test files"}
PASSING_ONLY = " (tilpass run on the {} cases that pass on PEFT)"
SAMPLE_SIZE = 300


def results_dir() -> Path:
    return cache_dir() / f"results-{PEFT_VERSION}"


def run_backend(
    backend: str,
    name: str,
    files: list[str],
    tests: Path,
    reuse: bool,
    src: Path | None = None,
    only: Path | None = None,
) -> list:
    """Run one selection with one backend (or reuse its saved records); `src` runs another
    tilpass source tree (its records are kept apart, under its folder's name); `only` limits
    the run to the test ids listed in that file."""
    label = backend if src is None else f"{backend}@{src.parent.name}"
    out = results_dir() / f"{name}-{label}.jsonl"
    if reuse and out.is_file():
        print(f"{name} / {label}: reusing {out}")
        return read_results(out)
    out.unlink(missing_ok=True)
    run = Run(backend, tests, files, out, only=only)
    if src is not None:
        run.src = src
    records, seconds, tail = run.execute()
    print(f"{name} / {label}: {len(records)} tests in {seconds / 60:.1f} min\n{tail}\n")
    (results_dir() / f"{name}-{label}.seconds").write_text(f"{seconds:.0f}\n")
    command = " ".join(["python compat/peft_suite/run.py", *sys.argv[1:]])
    (results_dir() / f"{name}-{label}.command").write_text(command + "\n")
    return records


def full(args: argparse.Namespace) -> dict[str, Selection]:
    """Both backends over the custom-models file and the other CPU test files (or one)."""
    selection_names(args.custom_only, args.others_only)  # a bad choice fails before the fetch
    tests = suite()
    results_dir().mkdir(parents=True, exist_ok=True)
    groups = selected_groups(tests, args.custom_only, args.others_only)
    selections = {}
    for name, files in groups.items():
        peft = run_backend("peft", name, files, tests, args.reuse_peft)
        only = _subset(name, peft, args.subset) if args.subset else None
        ran_files = files
        if args.passing_only:
            only = _subset(name, peft, len(peft))  # every case that passes on PEFT
            ids = only.read_text().splitlines()
            wanted = {line.split("::")[0].rsplit("/", 1)[-1] for line in ids}
            ran_files = [f for f in files if f in wanted]  # the others would collect nothing
        ours = run_backend("tilpass", name, ran_files, tests, False, args.src, only)
        title = (
            f"`{CUSTOM}`, all LoRA cases" if name == "custom" else f"{len(files)} {TITLES[name]}"
        )
        if args.passing_only:
            title += PASSING_ONLY.format(len(only.read_text().splitlines()))
        elif args.subset:
            ran = {r["id"] for r in ours}
            peft = [r for r in peft if r["id"] in ran]
            title += f" (random sample of {len(ran)} PEFT-passing cases)"
        selections[name] = compare(title, peft, ours)
    print(table(list(selections.values())))
    if args.write_docs and args.src is None:
        write_docs(selections)
    return selections


def selected_groups(tests: Path, custom_only: bool, others_only: bool) -> dict[str, list[str]]:
    """The test files of each selection `full` runs, by name."""
    names = selection_names(custom_only, others_only)
    return {n: [CUSTOM] if n == "custom" else other_files(tests) for n in names}


def _subset(name: str, peft: list[dict], size: int) -> Path:
    """A random sample (fixed seed) of `size` tests that pass on PEFT, for a quicker tilpass
    run whose pass rate estimates the full one's (`compare` then counts only the sample)."""
    passing = sorted(r["id"] for r in peft if r["outcome"] == "passed")
    chosen = sorted(random.Random(0).sample(passing, min(size, len(passing))))
    path = results_dir() / f"{name}-subset.txt"
    path.write_text("\n".join(chosen) + "\n")
    return path


def report_only(args: argparse.Namespace) -> dict[str, Selection]:
    """The table from the records of the last runs (nothing is run)."""
    selections = {}
    for name in selection_names(args.custom_only, args.others_only):
        peft, ours = (results_dir() / f"{name}-{b}.jsonl" for b in ("peft", "tilpass"))
        if peft.is_file() and ours.is_file():
            theirs, mine = read_results(peft), read_results(ours)
            title = f"`{CUSTOM}`, all LoRA cases" if name == "custom" else TITLES[name]
            ran = {r["id"] for r in mine}
            passing = {r["id"] for r in theirs if r["outcome"] == "passed"}
            if passing and len(passing & ran) >= 0.95 * len(passing) and len(ran) < len(theirs):
                title += PASSING_ONLY.format(len(passing))  # a `--passing-only` run
            elif len(ran) < 0.9 * len(theirs):  # a `--subset` run: judge the cases it ran
                theirs = [r for r in theirs if r["id"] in ran]
                title += f" (random sample of {len(ran)} PEFT-passing cases)"
            selections[name] = compare(title, theirs, mine)
    print(table(list(selections.values())))
    for s in selections.values():
        print(f"\n{s.title}:\n{top_errors(s, args.top)}")
    if args.write_docs:
        write_docs(selections)
    return selections


def selection_names(custom_only: bool, others_only: bool) -> list[str]:
    """The selections a command covers: `custom`, `others`, or (by default) both."""
    if custom_only and others_only:
        raise SystemExit("--custom-only and --others-only exclude each other; give one or neither")
    if custom_only:
        return ["custom"]
    return ["others"] if others_only else ["custom", "others"]


def write_docs(selections: dict[str, Selection]) -> None:
    """Replace each measured selection's part of docs/compatibility.md (between its own
    markers), so re-measuring one selection leaves the other's figures as they are."""
    text = DOC.read_text()
    for name, selection in selections.items():
        begin, end = MARKERS[name]
        if begin not in text or end not in text:
            raise SystemExit(f"{DOC}: no {begin} ... {end} markers to write {name!r} between")
        start, stop = text.index(begin), text.index(end) + len(end)
        text = text[:start] + "\n".join([begin, *docs_section(name, selection), end]) + text[stop:]
    DOC.write_text(text)
    print(f"wrote {DOC}")


def docs_section(name: str, selection: Selection) -> list[str]:
    """The Markdown of one selection's figures: when, where, the command, the table, the wall
    time of each backend's run and the most frequent first errors."""
    found = {b: results_dir() / f"{name}-{b}" for b in ("peft", "tilpass")}
    seconds = {
        b: p.with_suffix(".seconds").read_text().strip()
        for b, p in found.items()
        if p.with_suffix(".seconds").is_file()
    }
    records = found["tilpass"].with_suffix(".jsonl")
    stamp = datetime.datetime.fromtimestamp(records.stat().st_mtime, datetime.timezone.utc)
    when = stamp.strftime("%Y-%m-%d %H:%M UTC")
    versions = ", ".join(
        f"{p} {metadata.version(p)}" for p in ("torch", "transformers", "peft", "tilpass")
    )
    ran = found["tilpass"].with_suffix(".command")
    command = ran.read_text().strip() if ran.is_file() else "python compat/peft_suite/run.py full"
    return [
        f"Measured {when} on {platform.processor() or platform.machine()} "
        f"({versions}; OMP_NUM_THREADS=1), command `{command}`:",
        "",
        table([selection]),
        "",
        "\\* counted: tests that pass on PEFT, less those classed as research variants or PEFT "
        "internals; rate: tilpass passes over counted.",
        "",
        "Wall time per run (seconds): " + ", ".join(f"{b} {v}" for b, v in seconds.items()) + ".",
        "",
        f"Most frequent first errors (tilpass behaviour), {selection.title}:",
        "",
        top_errors(selection),
    ]


def make_sample(args: argparse.Namespace) -> None:
    """The CI sample: custom-models LoRA cases that pass on PEFT (a fixed random choice), each
    with the outcome it had on tilpass when chosen. CI fails when a case that passed fails."""
    records = results_dir() / args.records
    ours = {r["id"]: r["outcome"] for r in read_results(records)}
    peft = read_results(results_dir() / "custom-peft.jsonl")
    passing = sorted(r["id"] for r in peft if r["outcome"] == "passed" and r["id"] in ours)
    chosen = sorted(random.Random(0).sample(passing, min(SAMPLE_SIZE, len(passing))))
    lines = [f"{(ours[i] == 'passed' and 'pass') or 'fail'}\t{i}" for i in chosen]
    SAMPLE.write_text("\n".join(lines) + "\n")
    passed = sum(line.startswith("pass") for line in lines)
    print(f"{len(chosen)} cases ({passed} passing on tilpass) written to {SAMPLE}")


def read_sample() -> dict[str, bool]:
    """test id -> whether it passed on tilpass when the sample was made."""
    rows = [line.split("\t", 1) for line in SAMPLE.read_text().splitlines() if line.strip()]
    return {test: mark == "pass" for mark, test in rows}


def sample(args: argparse.Namespace) -> int:
    """Run the fixed sample through the shim (from the vendored archive; no network). Exit 1
    if a case that passed when the sample was made fails now."""
    expected = read_sample()
    with tempfile.TemporaryDirectory(prefix="peft-suite-") as tmp:
        tests = unpack(VENDORED, Path(tmp) / f"peft-{PEFT_VERSION}")
        ids = Path(tmp) / "ids.txt"
        ids.write_text("\n".join(expected) + "\n")
        run = Run("tilpass", tests, [CUSTOM], Path(tmp) / "r.jsonl", only=ids)
        records, seconds, _ = run.execute()
    outcome = {r["id"]: r for r in records}
    passed = [t for t in expected if outcome.get(t, {}).get("outcome") == "passed"]
    regressed = [t for t, ok in expected.items() if ok and t not in passed]
    print(f"{len(passed)} of {len(expected)} passed in {seconds:.0f} s "
          f"({sum(expected.values())} passed when the sample was made); "
          f"{len(regressed)} regressions")  # fmt: skip
    for test in regressed:
        print(f"  regressed: {test}: {outcome.get(test, {}).get('message', 'not run')}")
    return 1 if regressed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_full = sub.add_parser("full", help="both backends, every LoRA case")
    run_full.add_argument("--write-docs", action="store_true")
    run_full.add_argument("--reuse-peft", action="store_true")
    run_full.add_argument("--custom-only", action="store_true", help=f"only {CUSTOM}")
    run_full.add_argument(
        "--others-only", action="store_true", help="only the other hub-free CPU test files"
    )
    run_full.add_argument(
        "--subset", type=int, default=0, help="run tilpass on a random N of PEFT's passes only"
    )
    run_full.add_argument(
        "--passing-only",
        action="store_true",
        help="run tilpass only on the cases that pass on PEFT (the only ones counted)",
    )
    run_full.add_argument(
        "--src", type=Path, help="another tilpass src/ folder to measure (e.g. an older commit)"
    )
    only_report = sub.add_parser("report", help="the table from the last runs' records")
    only_report.add_argument("--write-docs", action="store_true")
    only_report.add_argument("--top", type=int, default=25)
    only_report.add_argument("--custom-only", action="store_true", help=f"only {CUSTOM}")
    only_report.add_argument("--others-only", action="store_true", help="only the other files")
    sub.add_parser("sample", help="the fixed CI sample (tilpass only)")
    pick = sub.add_parser("make-sample", help="choose the sample from a run's records")
    pick.add_argument("--records", default="custom-tilpass.jsonl")
    sub.add_parser("vendor", help="rebuild the sample's archive from the sdist")
    args = parser.parse_args(argv)
    if args.command == "full":
        full(args)
    elif args.command == "report":
        report_only(args)
    elif args.command == "sample":
        return sample(args)
    elif args.command == "make-sample":
        make_sample(args)
    else:
        print(vendor())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
