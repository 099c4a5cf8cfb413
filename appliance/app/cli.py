"""`appliance`: run the daemon, check a config, or score files offline with the daemon's own code."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
import time
from pathlib import Path

from appliance import __version__
from appliance.api.codec import result_to_dict, to_message
from appliance.api.tokens import Scope, TokenStore
from appliance.config import Config, load_config
from appliance.domain.errors import ApplianceError
from appliance.domain.manifest import Manifest, load_manifest
from appliance.domain.result import InputFacts, Result, Timings
from appliance.files.content_hash import digest_bytes
from appliance.imaging.overlay import render, text_grid, write_png
from appliance.imaging.reader import decode
from appliance.imaging.types import ImageMeta
from appliance.inference.batcher import BatchTiming
from appliance.inference.loader import open_backend
from appliance.inference.runs import rows_in_batches
from appliance.logging_setup import setup_logging
from appliance.prepare.preparer import Preparer
from appliance.scoring.job import Frame, Scorer
from appliance.scoring.results import build_results, rejected

log = logging.getLogger("appliance")

EXIT_CONFIG = 2  # systemd's RestartPreventExitStatus: a bad config is not fixed by restarting


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appliance", description=__doc__)
    p.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="Run the daemon: watch the folder, score, serve gRPC.")
    run.add_argument("--config", type=Path, default=None, help="TOML config (default: built-in defaults).")

    check = sub.add_parser("check-config", help="Validate the config and the model, then exit.")
    check.add_argument("--config", type=Path, default=None)

    token = sub.add_parser("token", help="Terminal tokens: add (printed once), list, revoke (no restart needed).")
    config_of = argparse.ArgumentParser(add_help=False)
    config_of.add_argument("--config", type=Path, default=None, help="The daemon's config (where the tokens are).")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    add = token_sub.add_parser("add", parents=[config_of], help="Make a token for a terminal and print it once.")
    add.add_argument("name", help="The terminal's name (its certificate's name under mutual TLS).")
    add.add_argument("--scope", choices=[s.name for s in Scope], default="read", help="read, score or admin.")
    token_sub.add_parser("list", parents=[config_of], help="Every terminal's token: name, scope, made, revoked.")
    revoke = token_sub.add_parser(
        "revoke", parents=[config_of], help="Revoke a terminal's token; the daemon refuses it at once."
    )
    revoke.add_argument("name")

    journal = sub.add_parser("journal", help="Check the journal, or recover a damaged one (daemon stopped).")
    journal_sub = journal.add_subparsers(dest="journal_command", required=True)
    for name, text in (
        ("check", "Print what is wrong with the journal (exit 2) or 'ok', as a start would."),
        ("recover", "Set a damaged journal aside, salvage its readable rows, continue the numbering after it."),
    ):
        journal_sub.add_parser(name, help=text).add_argument(
            "--config", type=Path, default=None, help="The daemon's config (where its data_dir is)."
        )

    score = sub.add_parser(
        "score",
        help="Score files offline (no daemon) and print one JSON object per result.",
        description="Score files offline with the daemon's own code (no daemon, no journal). stdout has one JSON "
        "object per result (a frame of a file), heatmap included, values base64, so scripts can read it; "
        "everything meant for a person (--heatmap, notes) goes to stderr.",
    )
    score.add_argument("files", nargs="+", type=Path)
    score.add_argument("--config", type=Path, default=None, help="Use this config's model, limits and threads.")
    score.add_argument("--model", type=Path, default=None, help="Model folder (overrides the config).")
    score.add_argument(
        "--heatmap",
        action="store_true",
        help="After each result, show on stderr where the model looked: the class it explains, the peak in the "
        "file's pixels, and the grid as rows of digits (tenths of the peak, '.' under a tenth). stdout is "
        "unchanged.",
    )
    score.add_argument(
        "--overlays",
        type=Path,
        default=None,
        metavar="DIR",
        help="Write each scored frame's heatmap over its image as a PNG: DIR/<file stem>.png, or "
        "<file stem>-frame<N>.png for frame N (from 1) of a multi-frame file; at the file's own size, the image "
        "windowed as the model saw it. Existing files of those names are replaced.",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
        if getattr(args, "model", None):
            config = config.model_copy(update={"model": config.model.model_copy(update={"dir": args.model})})
        setup_logging(config.logging.level, config.logging.json_format)
        if args.command == "run":
            return _run(config)
        if args.command == "check-config":
            return _check(config)
        if args.command == "token":
            return _token(config, args)
        if args.command == "journal":
            return _journal(config, args.journal_command)
        return _score(config, args)
    except ApplianceError as e:
        logging.basicConfig()
        log.error("%s", e.message)
        print(f"appliance: {e.message}", file=sys.stderr)
        return EXIT_CONFIG


def _run(config: Config) -> int:
    from appliance.app.daemon import Daemon
    from appliance.malloc_tuning import keep_freed_memory

    keep_freed_memory()

    daemon = Daemon(config)
    try:
        running = daemon.start()
    except BaseException:
        daemon.stop()
        raise
    daemon.run_forever(running)
    return 0


def _token(config: Config, args: argparse.Namespace) -> int:
    assert config.server.tokens_file is not None, "Config.resolved sets it"
    store = TokenStore(config.server.tokens_file)
    if args.token_command == "add":
        token = store.add(args.name, Scope[args.scope])
        print(token)
        print(
            f"# the {args.scope} token of terminal {args.name!r}: shown this once, only its hash is kept "
            f"({store.path}). Give it to the terminal as APPLIANCE_TOKEN or --token.",
            file=sys.stderr,
        )
        return 0
    if args.token_command == "revoke":
        store.revoke(args.name)
        print(f"revoked the token of terminal {args.name!r}; calls with it are refused from now on")
        return 0
    for r in store.records():
        made = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created_unix))
        state = (
            "revoked " + time.strftime("%Y-%m-%d %H:%M", time.localtime(r.revoked_unix)) if r.revoked_unix else "live"
        )
        print(f"{r.name:<24} {r.scope:<6} made {made}  {state}")
    return 0


def _check(config: Config) -> int:
    from appliance.api.tls import check_exposure, credentials

    assert config.server.tokens_file is not None, "Config.resolved sets it"
    check_exposure(config.server, TokenStore(config.server.tokens_file))
    credentials(config.server)  # the certificate and key are readable and the key is private
    loaded = load_manifest(config.model.dir)
    backend = open_backend(loaded, config.inference, config.model.engines_dir)
    backend.close()
    print(f"ok: model {loaded.manifest.model.name} {loaded.manifest.model.version} matches its manifest")
    return 0


def _journal(config: Config, command: str) -> int:
    """`journal check`: the daemon's own start-up verdict; `journal recover`: set aside, salvage, continue."""
    from appliance.journal import integrity

    path = config.storage.data_dir / integrity.JOURNAL_NAME
    if command == "check":
        problem = integrity.check(path, config.storage.identity_dir)
        print(f"appliance: {problem}" if problem else f"ok: the journal {path} is sound")
        return EXIT_CONFIG if problem else 0
    for line in integrity.recover(path, config.storage.identity_dir):
        print(line)
    return 0


def _score(config: Config, args: argparse.Namespace) -> int:
    """Same decode, preprocessing, inference and decision code as the daemon, without journal or server."""
    loaded = load_manifest(config.model.dir)
    manifest = loaded.manifest
    if args.overlays is not None:
        try:
            args.overlays.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"appliance: cannot make the overlay folder {args.overlays}: {e.strerror}", file=sys.stderr)
            return 1
    backend = open_backend(loaded, config.inference, config.model.engines_dir)
    scorer = Scorer(manifest, backend.name)
    preparer = Preparer(manifest, config.limits)
    overlays = _Overlays(args.overlays, preparer, _no_heatmap_reason(config, manifest)) if args.overlays else None
    failures = 0
    with backend:
        for number, path in enumerate(args.files, start=1):
            t0 = time.perf_counter()
            try:
                data = path.read_bytes()
            except OSError as e:
                print(f"appliance: cannot read {path}: {e.strerror}", file=sys.stderr)
                failures += 1
                continue
            facts = InputFacts(
                input_id=number,
                source="offline",
                file_name=path.name,
                content_hash=digest_bytes(data),
            )
            try:
                prepared = preparer.prepare(data, path.name)
            except ApplianceError as e:
                times = Timings(total_ms=(time.perf_counter() - t0) * 1e3)
                print(json.dumps(result_to_dict(to_message(rejected(facts, scorer, e, times)))))
                failures += 1
                continue
            t1 = time.perf_counter()
            rows = rows_in_batches(backend, prepared.tensors, manifest.output.activation)
            timing: BatchTiming[Scorer] = BatchTiming(
                queue_ms=0.0, infer_ms=(time.perf_counter() - t1) * 1e3, batch_size=len(rows)
            )
            frames: list[Frame | None] = [(row, None, timing) for row in rows]
            # The daemon's own result builder: an offline score is the daemon's result exactly.
            results = build_results(facts, prepared, frames, t0, scorer)
            for result in results:
                # Flushed: a person's lines on stderr come after the result they describe.
                print(json.dumps(result_to_dict(to_message(result))), flush=True)
                failures += result.rejected
                if args.heatmap and not result.rejected:
                    print(_heatmap_text(result, prepared.meta, _no_heatmap_reason(config, manifest)), file=sys.stderr)
            if overlays is not None:
                failures += overlays.write(path, data, results)
    return 1 if failures else 0


def _frame_name(result: Result) -> str:
    return result.input.file_name + (
        f" [frame {result.frame_index + 1}/{result.frame_count}]" if result.frame_count > 1 else ""
    )


def _no_heatmap_reason(config: Config, manifest: Manifest) -> str:
    if manifest.heatmap is None:
        return f"model {manifest.model.name} declares no [heatmap]"
    if not config.inference.heatmaps:
        return "heatmaps are turned off (inference.heatmaps = false)"
    return "the served artifact gives none (built before [heatmap]: `make engine` rebuilds it), or its map was unusable"


def _heatmap_text(result: Result, meta: ImageMeta, no_heatmap: str) -> str:
    """Where the model looked, for a person at a terminal: a line that says it, then the grid as digits."""
    h = result.heatmap
    if h is None:
        return f"{_frame_name(result)}: no heatmap: {no_heatmap}"
    x, y = h.peak
    head = (
        f"{_frame_name(result)}: looked at ({x:.0f}, {y:.0f}) of its {meta.columns} x {meta.rows} pixels for "
        f"{h.label} ({h.method}, {h.width} x {h.height} grid, tenths of the peak):"
    )
    return head + "\n" + textwrap.indent(text_grid(h), "  ")


class _Overlays:
    """`score --overlays DIR`: each scored frame's heatmap over the display frame the model saw, before its resize."""

    def __init__(self, folder: Path, preparer: Preparer, no_heatmap: str) -> None:
        self.folder, self.preparer, self.no_heatmap = folder, preparer, no_heatmap
        self.written: set[Path] = set()

    def write(self, path: Path, data: bytes, results: list[Result]) -> int:
        """Write the input's overlays; the number of frames that were scored but got none."""
        scored = [r for r in results if not r.rejected]
        if not scored:
            return 0
        missing = [r for r in scored if r.heatmap is None]
        for r in missing:
            print(f"appliance: no overlay for {_frame_name(r)}: {self.no_heatmap}", file=sys.stderr)
        if len(missing) == len(scored):
            return len(missing)
        try:
            # Decoded again, whole: the preparer keeps only the model's tensors, and may have shrunk the
            # frames while decoding. Same limits and windowing, so the same frames, at the file's own size.
            image = decode(data, limits=self.preparer.limits, preprocess=self.preparer.manifest.preprocess)
        except ApplianceError as e:
            print(f"appliance: no overlay for {path.name}: {e.message}", file=sys.stderr)
            return len(scored)
        failed = len(missing)
        for r in scored:
            if r.heatmap is None:
                continue
            target = self.folder / (path.stem + (f"-frame{r.frame_index + 1}" if r.frame_count > 1 else "") + ".png")
            if target in self.written:
                print(f"appliance: not writing {target} twice: two files are named {path.stem}", file=sys.stderr)
                failed += 1
                continue
            try:
                write_png(target, render(image.frames[r.frame_index], r.heatmap))
            except OSError as e:
                print(f"appliance: {e}", file=sys.stderr)
                failed += 1
                continue
            self.written.add(target)
        return failed


if __name__ == "__main__":
    sys.exit(main())
