"""Pages. Views read models and call studio.actions; they change nothing themselves."""

from __future__ import annotations

from django.contrib import messages
from django.core.paginator import Paginator
from django.db.models import Count
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from studio import actions
from studio.forms import NewRunForm
from studio.models import Run
from trainer import config

RUNS_PER_PAGE = 50
LOG_TAIL_LINES = 40


def dashboard(request):
    runs = Run.objects.prefetch_related("stages")
    page = Paginator(runs, RUNS_PER_PAGE).get_page(request.GET.get("page"))
    counts = dict(Run.objects.values_list("status").annotate(n=Count("id")).order_by())
    return render(request, "studio/dashboard.html", {
        "page": page,
        "counts": [(status, label, counts.get(status, 0)) for status, label in Run.Status.choices],
        "presets": config.PRESETS,
    })


def new_run(request):
    if request.method == "POST":
        form = NewRunForm(request.POST, preset=request.POST.get("preset", "tiny"))
        if form.is_valid():
            try:
                run = actions.create_run(form.cleaned_data["preset"], form.overrides, name=form.cleaned_data["name"])
            except config.ConfigError as e:  # same schema as the form: only a changed checkout gets here
                form.add_error(None, str(e))
            else:
                actions.enqueue_run(run)
                messages.success(request, f"Run {run.id} is queued. Start a worker with `python manage.py qcluster` if none is running.")
                return redirect(run)
    else:
        preset = request.GET.get("preset", "tiny")
        if preset not in config.PRESETS:
            preset = "tiny"
        form = NewRunForm(preset=preset)
    return render(request, "studio/new_run.html", {
        "form": form,
        "presets": config.PRESETS,
        "preset": form["preset"].value(),
    })


def run_detail(request, run_id):
    run = get_object_or_404(Run, pk=run_id)
    stages = list(run.stages.all())
    return render(request, "studio/run_detail.html", {
        "run": run,
        "stages": stages,
        "logs": [(stage, stage.log_tail(LOG_TAIL_LINES)) for stage in stages if stage.started_at],
        "events": run.latest_events(limit=30),
        "config_items": sorted((k, v) for k, v in run.config.items() if k != "description"),
    })


@require_POST
def cancel_run(request, run_id):
    run = get_object_or_404(Run, pk=run_id)
    if not run.is_active:
        messages.info(request, f"Run {run.id} is already {run.status}.")
    else:
        run = actions.cancel_run(run)
        if run.status == Run.Status.CANCELLED:
            messages.success(request, f"Run {run.id} cancelled.")
        else:
            messages.success(request, f"Stopping run {run.id}: its processes were asked to exit.")
    return redirect(run)
