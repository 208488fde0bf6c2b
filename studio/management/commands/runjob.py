"""Run a pipeline in the foreground, exactly as the studio's queue worker does.

    python manage.py runjob tiny
    python manage.py runjob speedrun --set depth=12 --gpus 1 --name "d12 on one GPU"
    python manage.py runjob --resume 20261124-101500-3fa9c1      # continue a paused/failed/cancelled run
                                                                 # (or take over one whose supervisor was killed)
    python manage.py runjob --resume 20261124-101500-3fa9c1 --gpus 4   # continue it on 4 GPUs instead

The run is recorded in the database and in runs/<id>/ like a run started from
the web, so the dashboard shows it. Exit status: 0 done, 1 failed,
2 invalid configuration, 75 paused (from the studio; --resume continues it), 130 interrupted (Ctrl-C, SIGTERM or SIGHUP: the
running stage's processes are killed and the run is marked cancelled).
"""

from __future__ import annotations

import logging
import signal
import time

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from studio import actions, supervisor
from studio.formatting import event_fields, event_lines, format_duration, format_fields
from studio.models import Run, StageRun
from pipeline import config

METRIC_EVERY_SECONDS = 1.0  # at most one progress line per stage per second


class Command(BaseCommand):
    help = "Run a preset's pipeline stages in the foreground (the same code the web queue runs)."

    def add_arguments(self, parser):
        parser.add_argument("preset", nargs="?", help=f"starting preset: {', '.join(config.PRESETS)}")
        parser.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a setting, e.g. --set depth=12 (repeatable; see `python -m pipeline.config`)",
        )
        parser.add_argument("--gpus", type=int, metavar="N",
                            help="GPUs per node (same as --set nproc_per_node=N); with --resume, continue on N GPUs "
                                 "(any count that divides the checkpoint's ranks x accumulation steps)")
        parser.add_argument("--resume", metavar="RUN_ID", help="continue a paused, failed or cancelled run instead of starting one")
        parser.add_argument("--user", help="record this studio user as the run's owner")
        parser.add_argument("--name", default="", help="a name to tell the run apart on the dashboard")
        parser.add_argument("--runs-dir", help="folder for the run directory (default: NANOSTUDIO_RUNS_DIR)")
        parser.add_argument("--quiet", action="store_true", help="print only the summary")

    def handle(self, *args, preset, overrides, name, runs_dir, quiet, gpus, resume, user, **options):
        self.quiet = quiet
        if (preset is None) == (resume is None):
            raise CommandError("give a preset to start a run, or --resume RUN_ID to continue one", returncode=2)
        if gpus is not None:
            if gpus < 1:
                raise CommandError("--gpus must be at least 1", returncode=2)
            if not resume:
                overrides = [*overrides, f"nproc_per_node={gpus}"]
        studio_log = logging.getLogger("studio")
        level = studio_log.level
        if options["verbosity"] < 2:
            # The progress lines say what the studio's INFO log lines would.
            studio_log.setLevel(logging.WARNING)
        try:
            self._run(preset, overrides, name, runs_dir, resume, user, gpus)
        finally:
            studio_log.setLevel(level)

    def _run(self, preset, overrides, name, runs_dir, resume, user, gpus=None):
        self._migrate_if_needed()
        # Runs whose supervisor died while their stage goes on are left for a
        # queue worker (or `runjob --resume`) to adopt; the others are marked.
        actions.reap_orphaned_runs(keep_adoptable=True)
        owner = self._user(user) if user else None
        adopt = False
        if resume:
            run = Run.objects.filter(pk=resume).first()
            if run is None:
                raise CommandError(f"no run {resume!r}; `python manage.py shell -c \"from studio.models import Run; "
                                   f"print(*Run.objects.values_list('id', 'status'))\"` lists them", returncode=2)
            adopt = run.status == Run.Status.RUNNING and run in supervisor.orphaned_runs()
            if not adopt:
                try:
                    run = actions.resume_run(run, enqueue=False, gpus=gpus)
                except actions.ActionError as e:
                    raise CommandError(str(e), returncode=2) from None
                except config.ConfigError as e:
                    raise CommandError(f"cannot resume run {run.id}: {e}", returncode=2) from None
        else:
            try:
                # Resolved once, here; create_run stores it as it is (and checks only this node's GPU count).
                cfg = config.resolve(preset, config.parse_overrides(overrides))
                run = actions.create_run(cfg, name=name, runs_dir=runs_dir, owner=owner)
            except config.ConfigError as e:
                self._explain(preset, e)
                raise CommandError("invalid configuration; nothing was run", returncode=2) from None

        self._say(f"run {run.id} ({run.preset}) in {run.run_dir}")
        self._last_metric: dict[str, float] = {}
        self._unprinted_metric: dict[str, dict] = {}
        # SIGTERM (kill, systemd) and SIGHUP (the terminal went away) stop the
        # run like Ctrl-C: the stage runs in its own session, so nothing else
        # would stop it, and nobody would be left to record how it ended.
        previous = {sig: signal.signal(sig, _raise_keyboard_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
        try:
            if adopt:
                self._say(f"its supervisor (pid {run.supervisor_pid}) is gone while its stage runs: following it from here")
                run = actions.adopt_run(run, on_event=self._on_event, on_stage=self._on_stage)
            else:
                run = actions.execute_run(run, on_event=self._on_event, on_stage=self._on_stage)
        except (actions.RunNotQueued, actions.RunNotOrphaned) as e:
            raise CommandError(f"{e}: another supervisor (a queue worker?) took it first; follow it on the dashboard",
                               returncode=1) from None
        except KeyboardInterrupt:
            run.refresh_from_db()
            self._summary(run)
            raise CommandError("interrupted: the running stage was stopped and the run marked cancelled", returncode=130) from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self._summary(run)
        if run.status == Run.Status.PAUSED:
            raise CommandError(f"run {run.id} paused; continue it with `python manage.py runjob --resume {run.id}`", returncode=75)
        if run.status != Run.Status.DONE:
            if run.error:
                self.stderr.write(run.error)
            raise CommandError(f"run {run.id} {run.status}", returncode=1)

    # --- output --------------------------------------------------------------------------------

    def _say(self, line: str, style=None) -> None:
        if not self.quiet:
            self.stdout.write(style(line) if style else line)

    def _on_stage(self, stage: StageRun) -> None:
        if stage.status == StageRun.Status.RUNNING:
            self._say(f"[{stage.name}] started (pid {stage.pid}): {stage.command_line}", self.style.MIGRATE_HEADING)
            return
        self._print_metric(stage.name)
        took = format_duration(stage.duration)
        if stage.status == StageRun.Status.DONE:
            self._say(f"[{stage.name}] done in {took}", self.style.SUCCESS)
        else:
            code = "" if stage.exit_code is None else f", exit code {stage.exit_code}"
            self._say(f"[{stage.name}] {stage.status} after {took}{code}", self.style.ERROR)

    def _on_event(self, event: dict) -> None:
        kind, stage = event.get("kind"), event.get("stage", "?")
        if kind in ("stage_start", "stage_end"):
            return  # _on_stage says it, with the duration
        if kind == "metric":
            # A compact progress line, at most one per second per stage; the
            # last one held back is printed when the stage ends.
            self._unprinted_metric[stage] = event
            now = time.monotonic()
            if now - self._last_metric.get(stage, -1e9) >= METRIC_EVERY_SECONDS:
                self._last_metric[stage] = now
                self._print_metric(stage)
        elif kind == "error":
            self._say(f"[{stage}] error: {event.get('message', '')}", self.style.ERROR)
        else:
            first, *rest = event_lines(event)
            self._say("\n".join([f"[{stage}] {kind}: {first}", *rest]))

    def _print_metric(self, stage: str) -> None:
        event = self._unprinted_metric.pop(stage, None)
        if event:
            self._say(f"[{stage}] {format_fields(event_fields(event))}")

    def _summary(self, run: Run) -> None:
        style = self.style.SUCCESS if run.status == Run.Status.DONE else self.style.ERROR
        lines = [
            f"run      {run.id}" + (f"  ({run.name})" if run.name else ""),
            f"dir      {run.run_dir}",
            "status   " + style(run.status),
        ]
        for i, stage in enumerate(run.stages.all()):
            lines.append(f"{'stages' if i == 0 else '':8} {stage.name:<12} {stage.status:<10} {format_duration(stage.duration)}")
        lines.append(f"total    {format_duration(run.duration)}")
        self.stdout.write("\n".join(lines))

    def _explain(self, preset: str, error: config.ConfigError) -> None:
        if "preset" in error.errors:
            self.stderr.write(f"Unknown preset {preset!r}. Presets:")
            for key, values in config.PRESETS.items():
                self.stderr.write(f"  {key:<10} {values.get('description', '')}")
            return
        self.stderr.write(f"Invalid configuration (preset {preset!r}):")
        for field, message in error.errors.items():
            self.stderr.write(self.style.ERROR(f"  {field}: {message}"))
            if field in config.FIELD_BY_NAME:
                self.stderr.write(f"      {config.FIELD_BY_NAME[field].help}")

    def _user(self, username: str):
        from django.contrib.auth import get_user_model

        try:
            return get_user_model().objects.get_by_natural_key(username)
        except get_user_model().DoesNotExist:
            raise CommandError(f"no studio user {username!r}; create one with `python manage.py createsuperuser`", returncode=2) from None

    def _migrate_if_needed(self) -> None:
        # The quick start is "setup, then runjob tiny": a fresh database must not trip it.
        executor = MigrationExecutor(connection)
        if executor.migration_plan(executor.loader.graph.leaf_nodes()):
            self._say("Preparing the database (applying migrations)...")
            call_command("migrate", interactive=False, verbosity=0)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
