"""Reliability, second round (issue 18): full disks, hostile caches, interrupts in the wrong place.

Each section tries a set of cases and counts those handled as the README says:

1. ``--report`` that cannot be written: a nearly full 64 KiB tmpfs (in a mount namespace of its
   own, when ``unshare`` can make one), ``/proc``, ``/sys``, a read-only bind mount.
2. Cache entries that parse but lie (``tests/test_cache_hostile.py``'s table): ignored with a
   warning, never trusted, never an error.
3. Non-regular files named like entries (a FIFO, a folder, a link to ``/dev/zero``, a link to a
   FIFO): ``get`` and ``entries`` return at once.
4. ``cache clear`` beside files that are not its own (a project's ``package.json``, a link named
   like an entry, a folder named like one, a cache folder that is a link): only entries go.
5. SIGINT / SIGTERM sent inside the save or the final restore: delivered after it, model whole.
6. An OOM inside ``MicroBatcher``'s optimizer step: ``DoesNotFitError``, and the next step works.
7. Non-finite losses and gradients in ``noise_scale``: a ``WorkloadError`` that says which.
8. A ``GradScaler`` on ``self`` (bound method, callable object): its scale is restored.
9. Cache hits: ``trials`` are this run's (the re-check), the stored search is apart.

Run from the repository root (about a minute on 2 busy cores)::

    python benchmarks/hardening.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import maxbatch  # noqa: E402
from maxbatch import WorkloadError, find_batch_size  # noqa: E402
from maxbatch.step.interrupt import Terminated, stop_signals  # noqa: E402
from maxbatch.store.cache import ResultCache  # noqa: E402

MLP = str(ROOT / "examples" / "mlp.py")
Figure = tuple[int, int, list[str]]  # (handled, tried, what was not handled)


def _figure(results: dict[str, bool]) -> Figure:
    wrong = [name for name, ok in results.items() if not ok]
    return len(results) - len(wrong), len(results), wrong


# -- 1. report files that cannot be written ----------------------------------------------------

_IN_NAMESPACE = """
mount -t tmpfs -o size=64k tmpfs "$1" || exit 99
head -c 49152 /dev/zero > "$1/other" || exit 99
[ "$4" = ro ] && { mkdir "$1/ro" && mount -o bind,ro "$1/ro" "$1/ro" || exit 99; }
"$2" -m maxbatch probe "$3" --memory 32MiB --no-cache --no-profile --report "$1/$5"
rc=$?
echo "left: [$(ls -A "$1")]"
exit $rc
"""


def _namespace_case(folder: Path, mode: str, target: str) -> bool | None:
    """A full or read-only file system in a mount namespace of its own; None: cannot make one."""
    if shutil.which("unshare") is None:
        return None
    cmd = ["unshare", "-rm", "sh", "-c", _IN_NAMESPACE, "sh", str(folder), sys.executable, MLP]
    done = subprocess.run([*cmd, mode, target], capture_output=True, text=True, timeout=600)
    if done.returncode == 99:
        return None
    last = (done.stderr.strip().splitlines() or [""])[-1]
    if mode == "ro":  # refused up front: exit 2, one line, no trial
        return done.returncode == 2 and "trial " not in done.stderr and "error: --report" in last
    return (
        done.returncode == 3
        and "ceiling: " in done.stdout
        and done.stdout.rstrip().endswith("left: [other]")
        and last.startswith("maxbatch: error: the report could not be written")
        and "Traceback" not in done.stderr
    )


def report_failures() -> Figure:
    """``--report`` on a full tmpfs, a read-only mount, ``/proc``, ``/sys``."""
    from click.testing import CliRunner

    from maxbatch.cli import main

    results: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, mode, target in [("full 64 KiB tmpfs", "full", "r"), ("read-only", "ro", "ro/r")]:
            folder = Path(tmp) / mode
            folder.mkdir()
            ok = _namespace_case(folder, mode, target)
            if ok is not None:
                results[name] = ok
    for target in ["/proc/maxbatch-report", "/sys/maxbatch-report", "/proc/self", "/sys/kernel"]:
        res = CliRunner().invoke(main, ["probe", MLP, "--memory", "32MiB", "--report", target])
        lines = res.stderr.strip().splitlines()
        results[target] = res.exit_code == 2 and len(lines) == 1 and "trial " not in res.stderr
    return _figure(results)


# -- 2.-4. the result cache ------------------------------------------------------------------------


def _stored_entry(cache: Path) -> tuple[str, dict[str, Any]]:
    os.environ["XDG_CACHE_HOME"] = str(cache)
    from test_cache_hostile import probe

    probe()
    (entry,) = ResultCache().directory.glob("*.json")
    return entry.stem, json.loads(entry.read_text())


def cache_lies(key: str, data: dict[str, Any]) -> Figure:
    """Entries that parse but lie: ignored with a warning, never trusted, never an error."""
    import copy

    from test_cache_hostile import LIES

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = ResultCache(Path(tmp))
        for name, lie in LIES.items():
            forged = copy.deepcopy(data)
            lie(forged["result"])
            store.path(key).write_text(json.dumps(forged))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    ok = store.get(key) is None and store.entries() == []
                except Exception:  # noqa: BLE001 - an error is a case not handled
                    ok = False
            results[name] = ok and any("invalid cache entry" in str(w.message) for w in caught)
    return _figure(results)


def _returns_soon(fn: Callable[[], Any], seconds: float = 10.0) -> bool:
    done: list[Any] = []
    thread = threading.Thread(target=lambda: done.append(fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(done)


def non_regular_entries(key: str) -> Figure:
    """A FIFO, a folder, a link to /dev/zero, a link to a FIFO, named like an entry."""
    results = {}
    makers: dict[str, Callable[[Path, Path], None]] = {
        "FIFO": lambda path, tmp: os.mkfifo(path),
        "folder": lambda path, tmp: path.mkdir(),
        "link to /dev/zero": lambda path, tmp: path.symlink_to("/dev/zero"),
        "link to a FIFO": lambda path, tmp: (os.mkfifo(tmp / "f"), path.symlink_to(tmp / "f")),
    }
    for name, make in makers.items():
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            store = ResultCache(Path(tmp) / "cache")
            store.directory.mkdir()
            make(store.path(key), Path(tmp))
            results[name] = _returns_soon(lambda s=store: (s.get(key), s.entries()))
    return _figure(results)


def cache_clear_safety() -> Figure:
    """Foreign files beside entries, links named like entries, a cache folder that is a link."""
    results = {}
    own = "a" * 32
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        project, cache = base / "project", base / "cache"
        project.mkdir()
        cache.mkdir()
        (project / "package.json").write_text("{}")
        (project / f"{'d' * 32}.txt").write_text("mine")
        (base / "outside.json").write_text("{}")
        (cache / f"{own}.json").write_text("{}")
        (cache / f".{own}.x.tmp").write_text("")
        (cache / "notes.json").write_text("{}")
        (cache / f"{'b' * 32}.json").symlink_to(base / "outside.json")
        (cache / f"{'c' * 32}.json").mkdir()
        (cache / f"{'e' * 32}.json").symlink_to(project)
        removed = ResultCache(cache).clear()
        results["own entry and temporary file removed"] = removed == 1 and not any(
            p.name.startswith((own, f".{own}")) for p in cache.iterdir()
        )
        results["a foreign .json stays"] = (cache / "notes.json").exists()
        results["a link named like an entry: neither it nor its target"] = (
            base / "outside.json"
        ).exists() and (cache / f"{'b' * 32}.json").is_symlink()
        results["a folder named like an entry stays"] = (cache / f"{'c' * 32}.json").is_dir()
        results["a link to a folder: its files stay"] = (project / f"{'d' * 32}.txt").exists()
        (base / "linked").symlink_to(project)
        results["a cache folder that is a link into a project"] = (
            ResultCache(base / "linked").clear() == 0 and (project / "package.json").exists()
        )
    return _figure(results)


# -- 5. interrupts inside the save and the final restore ---------------------------------------


def held_interrupts() -> Figure:
    """SIGINT / SIGTERM x save / final restore x Adam / SGD: delivered after, the model whole."""
    from test_signals_held import Tripwire, assert_whole, user_model

    results = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        for when in ("save", "final restore"):
            for opt in ("adam", "sgd"):
                model, grads, values = user_model()
                wire = Tripwire(model, signum, when)
                expected = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
                try:
                    with stop_signals():
                        find_batch_size(
                            model,
                            torch.randn(4, 16),
                            memory="4MiB",
                            optimizer=opt,
                            profile=False,
                            extra_state=[wire],
                            max_batch_size=64,
                        )
                    ok = False
                except expected:
                    try:
                        assert_whole(model, grads, values)
                        ok = wire.sent == 1
                    except AssertionError:
                        ok = False
                results[f"{signal.Signals(signum).name} in the {when}, {opt}"] = ok
    return _figure(results)


# -- 6.-8. MicroBatcher's optimizer step, noise NaN, scalers on self -----------------------------


def optimizer_ooms() -> Figure:
    """An OOM in MicroBatcher's optimizer step (first step: 3 optimizers; later: Adam, AdamW)."""
    import test_microbatch_optimizer_oom as t

    results = {}
    for kind in t.OPTIMIZERS:
        results[f"first step, {kind}"] = _passes(
            t.test_an_oom_making_the_optimizer_state_leaves_an_optimizer_the_next_step_accepts, kind
        )
    for kind in ("Adam", "AdamW"):
        results[f"later step, {kind}"] = _passes(
            t.test_an_oom_in_a_later_step_keeps_the_state_and_its_step_count, kind
        )
    return _figure(results)


def _passes(check: Callable[..., None], *args: Any) -> bool:
    try:
        check(*args)
    except Exception:  # noqa: BLE001 - any failure is a case not handled
        return False
    return True


def noise_non_finite() -> Figure:
    """NaN / inf inputs, an infinite loss, NaN gradients: a WorkloadError naming which."""
    import test_noise_nonfinite as t

    cases = {
        "NaN input": (t.data(float("nan")), t.mse, "the loss was NaN or infinite"),
        "inf input": (t.data(float("inf")), t.mse, "the loss was NaN or infinite"),
        "inf loss": (t.data(), lambda o, b: t.mse(o, b) * float("inf"), "the loss was NaN"),
        "NaN gradient": (t.data(), t.nan_gradient, "the gradient was NaN or infinite"),
    }
    results = {}
    for name, (x, loss, says) in cases.items():
        torch.manual_seed(0)
        try:
            maxbatch.noise_scale(torch.nn.Linear(3, 1), x, loss_fn=loss, batches=4, b_small=8)
            results[name] = False
        except WorkloadError as e:
            results[name] = says in str(e)
    return _figure(results)


def scalers_on_self() -> Figure:
    """A GradScaler on self (bound method, callable object) and in a closure: scale restored."""
    import test_scaler_on_self as t
    from test_snapshot import _ema_step

    results = {
        kind: _passes(t.test_the_scaler_on_self_is_found_and_its_scale_restored, kind)
        for kind in ("bound method", "callable object")
    }
    from models import mlp

    model, sample = mlp()
    scaler = torch.amp.GradScaler("cpu", growth_interval=1)
    step = _ema_step(mlp()[0], scaler, torch.zeros(()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step(model, sample, opt)
    value = scaler.get_scale()
    find_batch_size(model, sample, optimizer=opt, train_step=step, memory=t.CAP, profile=False)
    results["closure"] = scaler.get_scale() == value
    return _figure(results)


# -- 9. cache hits: this run's trials, the stored search apart ------------------------------------


def cache_hit_records(cache: Path) -> Figure:
    """A checked hit and a trusted hit: ``trials`` are this run's, the closing line says so."""
    from test_cache_hostile import probe

    from maxbatch.store.report import closing_line

    os.environ["XDG_CACHE_HOME"] = str(cache)
    first = probe()
    results = {}
    for name, trust in [("checked hit", False), ("trusted hit", True)]:
        seen: list[Any] = []
        hit = probe(on_trial=seen.append, trust_cache=trust)
        stored = hit.cached_search
        results[name] = (
            hit.from_cache
            and list(hit.trials) == seen
            and len(seen) == (0 if trust else 2)
            and stored is not None
            and len(stored.trials) == len(first.trials)
            and closing_line(hit).startswith("from the cache: ")
        )
    return _figure(results)


SECTIONS = {
    "--report write failures handled": report_failures,
    "cache entries that lie, ignored": None,
    "non-regular files named like entries, no hang": None,
    "cache clear: only its own files": cache_clear_safety,
    "interrupts in save / final restore, held": held_interrupts,
    "OOM in MicroBatcher's optimizer step, recoverable": optimizer_ooms,
    "non-finite noise-scale losses, an error": noise_non_finite,
    "GradScaler on self or in a closure, restored": scalers_on_self,
    "cache hits with this run's trials": None,
}


def figures() -> dict[str, Figure]:
    """Every section's figure (handled, tried, not handled)."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        old = os.environ.get("XDG_CACHE_HOME")
        try:
            key, data = _stored_entry(Path(tmp) / "one")
            done = {
                "cache entries that lie, ignored": cache_lies(key, data),
                "non-regular files named like entries, no hang": non_regular_entries(key),
                "cache hits with this run's trials": cache_hit_records(Path(tmp) / "two"),
            }
        finally:
            if old is None:
                os.environ.pop("XDG_CACHE_HOME", None)
            else:
                os.environ["XDG_CACHE_HOME"] = old
    return {name: done[name] if fn is None else fn() for name, fn in SECTIONS.items()}


def main() -> int:
    found = figures()
    width = max(map(len, found))
    for name, (handled, tried, _) in found.items():
        print(f"{name:<{width}}  {handled} of {tried}")
    for name, (_, _, wrong) in found.items():
        for case in wrong:
            print(f"  not as it should be: {name}: {case}")
    return 0 if all(not wrong for _, _, wrong in found.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
