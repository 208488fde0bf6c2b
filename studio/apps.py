from django.apps import AppConfig


class StudioConfig(AppConfig):
    name = "studio"
    verbose_name = "Studio"

    def ready(self):
        from django_q.signals import post_spawn

        post_spawn.connect(reap_on_worker_start, dispatch_uid="studio.reap_on_worker_start")


def reap_on_worker_start(sender, proc_name=None, **kwargs):
    # A worker that starts after a crash, a kill -9 or a reboot finds runs
    # still marked running whose supervisor is gone: mark them at once (they
    # can then be resumed) rather than when the next run happens to start.
    import logging

    from django.db import DatabaseError

    from studio.actions import reap_orphaned_runs

    try:
        for run in reap_orphaned_runs():
            logging.getLogger(__name__).warning("run %s was interrupted; marked failed (resumable)", run.id)
    except DatabaseError as e:  # e.g. migrations not applied yet: the task-time check still runs
        logging.getLogger(__name__).warning("could not check for interrupted runs: %s", e)
