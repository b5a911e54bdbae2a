"""Fault injection: kill every long dogtl command at seeded random moments, rerun it, compare.

For each command (extract-features, extract-features --shard, merge-cache --copy, train-head,
finetune --deterministic, sweep) and each fault:
  kill    SIGKILL at a random moment
  term    SIGTERM at a random moment
  int     SIGINT (Ctrl-C) at a random moment
  full    the disk fills up at a random moment (the outputs are on a small tmpfs, which a
          filler file fills; needs root, else skipped), then the filler is removed
the same command is rerun to completion and its outputs are compared with an uninterrupted
run's: bit-identical features, model weights, metrics and sweep results (times excepted).
The moments are drawn with --seed (printed first; `--seed random` draws one): half uniform over
the uninterrupted run's wall time, half over its final phase, where a kill leaves temporaries
behind: from the moment the first output or a temporary file of one appears (watched for, so
a machine slower than when the uninterrupted run was timed does not move them) to 0.5 s after
the uninterrupted run exited (the final writes, renames and clean-up), written "end+S" below.
With --jobs 2 or more the two uninterrupted runs that time this run side by side, as the
faulted runs do.

    python benchmarks/faults.py --runs 10 --seed random   # every command and fault (long: ~1 h on 2 cores)
    python benchmarks/faults.py --runs 3 --commands extract,train-head --faults kill,full

Prints one table: runs, interrupted (the fault hit a running command), clean (a one-line message
or none, no traceback), resumed (the rerun finished), identical (to the uninterrupted run) and
tidy (no lock, temporary or progress file left after the rerun) and late (the fault hit after
the final rename, while the command was exiting: its outputs were complete, and the rerun said
they exist; counted as resumed).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

CHEAP = ["--backbone", "resnet50", "--weights", "none", "--image-size", "32", "--batch-size", "4"]
EXTRACT = [*CHEAP, "--passes", "2", "--tta-passes", "1"]
FAULTS = ("kill", "term", "int", "full")
SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}
TIMES = {"seconds"}  # columns/keys that are wall times, never compared


@dataclass
class Command:
    name: str
    args: list  # {data}, {inputs}, {out} are filled in
    outputs: list  # files under {out} to compare
    tmpfs_mb: int = 48  # the small disk of the "full" fault: room for an uninterrupted run


COMMANDS = [
    Command("extract", ["extract-features", "--data", "{data}", "--cache", "{out}/c.h5", *EXTRACT], ["c.h5"],
            tmpfs_mb=160),  # the calibrated --weights none backbone (91 MB) is kept beside the cache
    Command("extract --shard", ["extract-features", "--data", "{data}", "--cache", "{out}/c.h5", *EXTRACT,
                                "--shard", "2/2"], ["c.shard-2-of-2.h5"], tmpfs_mb=160),
    Command("merge-cache --copy", ["merge-cache", "{inputs}/c.shard-1-of-2.h5", "{inputs}/c.shard-2-of-2.h5",
                                   "--copy", "--out", "{out}/m.h5"], ["m.h5"]),
    Command("train-head", ["train-head", "--cache", "{inputs}/c.h5", "--out", "{out}/h.keras", "--epochs", "6",
                           "--patience", "100"], ["h.keras", "h.json", "h.history.csv"]),
    Command("finetune", ["finetune", "--data", "{data}", "--head", "{inputs}/head.keras", "--out", "{out}/f.keras",
                         "--epochs", "3", "--batch-size", "8", "--trainable-blocks", "1", "--patience", "100",
                         "--deterministic"], ["f.keras", "f.json", "f.history.csv"], tmpfs_mb=800),
    Command("sweep", ["sweep", "--cache", "{inputs}/c.h5", "--param", "max_lr=1e-3,3e-3", "--param", "hidden=16,32",
                      "--epochs", "3", "--fuse", "1", "--out", "{out}/s"], ["s/results.csv"]),
]


def dogtl(args, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dogtl.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _env():
    """This process's environment, with an absolute PYTHONPATH (the commands run in other folders)
    that finds the same dogtl as this script."""
    import dogtl

    paths = [str(Path(dogtl.__file__).resolve().parents[1])]
    paths += [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(paths)}


def setup(root: Path) -> dict:
    """The data and the inputs the commands read (made once, uninterrupted)."""
    from dogtl.data.synthetic import make_kaggle_dataset

    inputs = root / "inputs"
    if (inputs / "head.keras").exists():  # made by an earlier run in this --dir
        return {"data": str(root / "data"), "inputs": str(inputs)}
    data = make_kaggle_dataset(root / "data", num_classes=3, per_class=8, test_images=4, size=48, seed=0)
    inputs = root / "inputs"
    inputs.mkdir(exist_ok=True)
    steps = [["extract-features", "--data", str(data), "--cache", str(inputs / "c.h5"), *EXTRACT, "--dtype", "float32"],
             *[["extract-features", "--data", str(data), "--cache", str(inputs / "c.h5"), *EXTRACT, "--shard", f"{i}/2"]
               for i in (1, 2)],
             ["train-head", "--cache", str(inputs / "c.h5"), "--out", str(inputs / "head.keras"), "--epochs", "3"]]
    for step in steps:
        r = dogtl(step, root)
        if r.returncode != 0:
            sys.exit(f"setup failed: dogtl {' '.join(step)}\n{r.stderr}")
    return {"data": str(data), "inputs": str(inputs)}


def _argv(command: Command, paths: dict, out: Path) -> list[str]:
    return [a.format(**paths, out=out) for a in command.args]


# -- comparing outputs ------------------------------------------------------------------------

def _h5_content(path, out: Path | None = None) -> dict:
    """Every attribute and dataset; the run's own output folder in an attribute (the calibrated
    `--weights none` backbone kept beside the cache) reads `{out}`, as each run writes to its own
    folder, and the cache's content_sha256, a digest of those attributes, is left out."""
    content = {}
    with h5py.File(path, "r") as f:
        for k, v in f.attrs.items():
            if k != "content_sha256":
                content[f"@{k}"] = str(v).replace(str(out.resolve()), "{out}") if out else str(v)

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                value = obj[()]
                content[name] = value.tobytes() if isinstance(value, np.ndarray) and value.dtype.kind != "O" else \
                    repr(value.tolist() if isinstance(value, np.ndarray) else value)
                for k, v in obj.attrs.items():
                    content[f"{name}@{k}"] = repr(v)
        f.visititems(visit)
    return content


def _keras_weights(path) -> dict:
    with zipfile.ZipFile(path) as z, tempfile.TemporaryDirectory() as tmp:
        z.extract("model.weights.h5", tmp)
        return _h5_content(Path(tmp) / "model.weights.h5")


def _csv_rows(path) -> list:
    rows = list(csv.DictReader(io.StringIO(Path(path).read_text())))
    return [{k: v for k, v in r.items() if k not in TIMES} for r in rows]


def _json_content(path) -> dict:
    meta = json.loads(Path(path).read_text())
    drop = {"integrity", "seconds", "cache", "history"}  # the model hash covers zip timestamps

    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in drop and not k.endswith("seconds")}
        return v
    meta = strip(meta)
    meta.get("settings", {}).pop("out", None)
    return meta


def content(path: Path, out: Path):
    if path.suffix == ".h5":
        return _h5_content(path, out)
    if path.suffix == ".keras":
        return _keras_weights(path)
    if path.suffix == ".csv":
        return _csv_rows(path)
    if path.suffix == ".json":
        return _json_content(path)
    return path.read_bytes()


def outputs_of(command: Command, out: Path) -> dict | None:
    try:
        return {name: content(out / name, out) for name in command.outputs}
    except (OSError, KeyError, ValueError) as e:
        return {"unreadable": str(e)}


def untidy(out: Path) -> list[str]:
    """Locks, temporary files and progress folders left behind."""
    left = []
    for p in out.rglob("*"):
        n = p.name
        if n.endswith(".lock") or ".tmp" in n or n.endswith(".partial") or n.endswith(".takeover"):
            left.append(str(p.relative_to(out)))
    return left


# -- faults -----------------------------------------------------------------------------------

@dataclass
class Outcome:
    interrupted: bool
    clean: bool
    resumed: bool
    identical: bool
    tidy: bool
    note: str = ""
    late: bool = False  # the fault hit after the final rename: the outputs were complete already


def _fill(folder: Path) -> Path:
    """Fill the file system holding `folder` (a filler file, written until ENOSPC)."""
    filler = folder / "filler"
    block = b"\0" * (1 << 20)
    try:
        with open(filler, "wb") as f:
            while True:
                f.write(block)
                f.flush()
    except OSError:
        pass
    try:
        with open(filler, "ab") as f:  # the last bytes too
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:
        pass
    return filler


def _clean_output(stderr: str) -> bool:
    """No traceback; at most one 'error:' line (a message a user can act on)."""
    return "Traceback" not in stderr and sum(line.startswith("error: ") for line in stderr.splitlines()) <= 1


@dataclass(frozen=True)
class Moment:
    seconds: float
    after_final: bool = False  # counted from the start of the final phase, not from the start

    def __str__(self):
        return f"end+{self.seconds:.1f}" if self.after_final else f"{self.seconds:.1f}"


def in_final_phase(command: Command, out: Path) -> bool:
    """An output, or a temporary file of one (`<stem>.tmp-<pid>...`, `<name>.tmp`), exists."""
    for name in command.outputs:
        target = out / name
        stem = target.name.partition(".")[0]
        try:
            if any(e.name == target.name or e.name.startswith(f"{stem}.tmp-") or e.name == target.name + ".tmp"
                   for e in target.parent.iterdir()):
                return True
        except FileNotFoundError:
            pass
    return False


def _wait(process: subprocess.Popen, command: Command, out: Path, moment: Moment) -> None:
    """Until `moment` or the process's exit, whichever comes first."""
    if moment.after_final:
        while process.poll() is None and not in_final_phase(command, out):
            time.sleep(0.01)
    try:
        process.wait(timeout=moment.seconds)
    except subprocess.TimeoutExpired:
        pass


def one_run(command: Command, fault: str, paths: dict, folder: Path, moment: Moment, reference: dict,
            limit: float = 900) -> Outcome:
    """`limit`: seconds the faulted run, and then its rerun, may take."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "out"
    out.mkdir(exist_ok=True)
    mounted = False
    if fault == "full":
        out.mkdir(exist_ok=True)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={command.tmpfs_mb}m", "tmpfs", str(out)]).returncode == 0
        if not mounted:
            return Outcome(False, False, False, False, False, "cannot mount a tmpfs (needs root)")
    try:
        argv = _argv(command, paths, out)
        # SIGINT's default restored: a shell's background job (`... &`) starts with it ignored,
        # and so would the command, which would never see the Ctrl-C this sends.
        process = subprocess.Popen([sys.executable, "-m", "dogtl.cli", *argv], cwd=folder, env=_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        filler = None
        _wait(process, command, out, moment)
        if process.poll() is None:
            if fault == "full":
                filler = _fill(out)
            else:
                process.send_signal(SIGNALS[fault])
        _, stderr = process.communicate(timeout=limit)
        (folder / "fault.stderr").write_text(stderr)
        interrupted = process.returncode != 0
        clean = fault == "kill" or _clean_output(stderr)
        note = "" if clean else stderr.strip().splitlines()[-1][:200]
        if filler is not None:
            filler.unlink()
        if interrupted:  # the same command again, to finish the work
            try:
                rerun = dogtl(argv, folder, timeout=limit)
            except subprocess.TimeoutExpired:  # a row goes on; what was left is in the folder
                return Outcome(interrupted, clean, False, False, False, f"the rerun ran past {limit:.0f} s")
            (folder / "rerun.stderr").write_text(rerun.stderr)
        else:  # it finished before the fault: a rerun would (rightly) refuse to overwrite
            rerun = process
        got = outputs_of(command, out)
        # Killed after its final rename (while exiting): the outputs are complete, and the rerun
        # rightly refuses to overwrite them without --force. Nothing is lost: counted as resumed.
        late = (interrupted and rerun.returncode != 0 and "exists: pass --force" in rerun.stderr
                and got == reference)
        resumed = rerun.returncode == 0 or late
        if not resumed:
            note = note or (rerun.stderr.strip().splitlines() or ["?"])[-1][:200]
        identical = resumed and got == reference
        left = untidy(out)
        if resumed and not identical and not note:
            note = "differs: " + ", ".join(k for k in reference if got.get(k) != reference[k])
            if mounted:  # keep what differs: the tmpfs goes away below
                shutil.copytree(out, folder / "out-differs", ignore=shutil.ignore_patterns("filler"))
        if left and not note:
            note = "left " + ", ".join(left[:3])
        return Outcome(interrupted, clean, resumed, identical, not left, note, late)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(out)])


@dataclass
class Timing:
    seconds: float  # from start to exit
    final_at: float  # when its final phase began (in_final_phase)


def reference_run(command: Command, paths: dict, folder: Path) -> tuple[dict, Timing]:
    """An uninterrupted run: its outputs, and when its outputs appeared and it exited."""
    out = folder / "out"
    out.mkdir(parents=True, exist_ok=True)
    started, final_at = time.perf_counter(), None
    with open(folder / "stderr", "w+") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "dogtl.cli", *_argv(command, paths, out)], cwd=folder,
                                   env=_env(), stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        while process.poll() is None:
            if final_at is None and in_final_phase(command, out):
                final_at = time.perf_counter() - started
            time.sleep(0.01)
        seconds = time.perf_counter() - started
        if process.returncode != 0:
            stderr.seek(0)
            sys.exit(f"uninterrupted {command.name} failed:\n{stderr.read()}")
    return outputs_of(command, out), Timing(seconds, seconds if final_at is None else final_at)


def draw_moments(rng: random.Random, runs: int, timing: Timing) -> list[Moment]:
    """Every other moment over the whole run, the others over its final phase (see the docstring)."""
    return [Moment(rng.uniform(0, timing.seconds - timing.final_at + 0.5), after_final=True) if i % 2
            else Moment(rng.uniform(0, timing.seconds)) for i in range(runs)]


def parse_seed(text: str) -> int:
    if text == "random":
        return random.SystemRandom().randrange(1, 10**6)
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed {text!r}: give a whole number or 'random'") from None


def determinism_cost(paths: dict, root: Path, repeats: int = 2) -> None:
    """finetune's wall time with and without --deterministic, measured alternately in one run."""
    base = next(c for c in COMMANDS if c.name == "finetune")
    plain = Command("finetune", [a for a in base.args if a != "--deterministic"], base.outputs)
    times = {"--deterministic": [], "default": []}
    weights = {"--deterministic": [], "default": []}
    for i in range(repeats):
        for label, command in (("default", plain), ("--deterministic", base)):
            ref, timing = reference_run(command, paths, root / f"cost-{label}-{i}")
            times[label].append(timing.seconds)
            weights[label].append(ref["f.keras"])
    print("\nfinetune (3 epochs, synthetic images, CPU): wall time per run, including start-up")
    for label in ("default", "--deterministic"):
        same = all(w == weights[label][0] for w in weights[label])
        print(f"  {label:16s} {np.median(times[label]):6.1f} s  runs bit-identical: {same}")
    print(f"  cost of --deterministic: {np.median(times['--deterministic']) / np.median(times['default']):.2f}x")


HEADER = f"{'command':20s} {'fault':5s} {'runs':>4s} {'interrupted':>11s} {'clean':>5s} {'resumed':>7s} " \
         f"{'identical':>9s} {'tidy':>4s} {'late':>4s}"


def table_line(r: dict) -> str:
    return (f"{r['command']:20s} {r['fault']:5s} {r['runs']:4d} {r['interrupted']:11d} {r['clean']:5d} "
            f"{r['resumed']:7d} {r['identical']:9d} {r['tidy']:4d} {r['late']:4d}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="runs per command and fault")
    parser.add_argument("--seed", type=parse_seed, default=15,
                        help="seed of the moments (a number, or 'random' to draw one; printed either way)")
    parser.add_argument("--commands", default=",".join(c.name for c in COMMANDS),
                        help="comma-separated: " + ", ".join(c.name for c in COMMANDS))
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated: " + ", ".join(FAULTS))
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--determinism-cost", action="store_true", help="also time finetune with/without --deterministic")
    args = parser.parse_args(argv)

    root = Path(args.dir or tempfile.mkdtemp(prefix="dogtl-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    wanted = [c for c in COMMANDS if c.name in args.commands.split(",")]
    faults = [f for f in args.faults.split(",") if f in FAULTS]
    if "full" in faults and os.geteuid() != 0:
        print("skipping the full-disk fault: it mounts a tmpfs, which needs root")
        faults.remove("full")
    print(f"seed {args.seed}; work folder {root}; {args.runs} runs per command and fault", flush=True)
    paths = setup(root)
    rows = []
    for command in wanted:
        slug = command.name.replace(" ", "").replace("--", "-")
        # Two uninterrupted runs, side by side when the faulted runs will be: the first is the
        # reference, the second says whether the command is reproducible at all.
        with ThreadPoolExecutor(min(2, args.jobs)) as pool:
            (reference, timing), (again, timing2) = pool.map(
                lambda name: reference_run(command, paths, root / slug / name), ["reference", "reference-2"])
        timing = Timing((timing.seconds + timing2.seconds) / 2, (timing.final_at + timing2.final_at) / 2)
        print(f"{command.name}: uninterrupted run {timing.seconds:.1f} s (final phase from {timing.final_at:.1f} s); "
              f"a second uninterrupted run identical: {again == reference}", flush=True)
        rng = random.Random(f"{args.seed}-{command.name}")
        for fault in faults:
            moments = draw_moments(rng, args.runs, timing)
            limit = max(900.0, 5 * timing.seconds)  # a loaded machine may be slower still
            def run(im):  # each run's outcome as it comes (a long row stopped early keeps them)
                outcome = one_run(command, fault, paths, root / slug / f"{fault}-{im[0]}", im[1], reference, limit)
                print(f"    {fault}-{im[0]} at {im[1]} s: {outcome}", flush=True)
                return outcome
            with ThreadPoolExecutor(args.jobs) as pool:
                outcomes = list(pool.map(run, enumerate(moments)))
            row = {"command": command.name, "fault": fault, "runs": len(outcomes),
                   **{k: sum(getattr(o, k) for o in outcomes) for k in ("interrupted", "clean", "resumed",
                                                                      "identical", "tidy", "late")},
                   "notes": sorted({o.note for o in outcomes if o.note})}
            rows.append(row)
            print(f"  {table_line(row)}  (moments {', '.join(map(str, moments))} s)"
                  + (f"; notes: {row['notes'][:3]}" if row["notes"] else ""), flush=True)
    print(f"\nseed {args.seed}")
    print(HEADER)
    print("-" * len(HEADER))
    for r in rows:
        print(table_line(r))
    if args.determinism_cost:
        determinism_cost(paths, root)
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    failed = [r for r in rows if any(r[k] != r["runs"] for k in ("clean", "resumed", "identical", "tidy"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
