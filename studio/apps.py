from django.apps import AppConfig


class StudioConfig(AppConfig):
    name = "studio"
    verbose_name = "Studio"

    def ready(self):
        from django_q.signals import post_spawn

        post_spawn.connect(recover_on_worker_start, dispatch_uid="studio.recover_on_worker_start")


def recover_on_worker_start(sender, proc_name=None, **kwargs):
    # A worker that starts after a crash, a kill -9 or a reboot finds runs
    # still marked running whose supervisor is gone, and queued runs whose
    # task the dead cluster had taken: it adopts or marks the former and
    # enqueues the latter again (studio/tasks.py says how).
    from studio.tasks import on_worker_start

    on_worker_start(sender, proc_name=proc_name, **kwargs)
