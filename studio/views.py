"""Pages and JSON endpoints. Views read models and call studio.actions; they change nothing themselves.

Every view needs a logged-in user (LoginRequiredMiddleware in settings).
"""

from __future__ import annotations

from django.contrib import messages
from django.core.paginator import Paginator
from django.db.models import Count
from django.http import FileResponse, Http404, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.http import urlencode
from django.views.decorators.http import require_GET, require_POST

from studio import actions, chat
from studio.forms import NewRunForm
from studio.live import run_state
from studio.models import Conversation, Run
from studio.render import markdown_html
from pipeline import config, estimate, hardware

RUNS_PER_PAGE = 50
COMPARE_MAX_RUNS = 8
LOG_TAIL_LINES = 40


def dashboard(request):
    runs = Run.objects.prefetch_related("stages").select_related("owner")
    page = Paginator(runs, RUNS_PER_PAGE).get_page(request.GET.get("page"))
    counts = dict(Run.objects.values_list("status").annotate(n=Count("id")).order_by())
    return render(request, "studio/dashboard.html", {
        "page": page,
        "counts": [(status, label, counts.get(status, 0)) for status, label in Run.Status.choices],
        "presets": config.PRESETS,
    })


@require_GET
def runs_json(request):
    """State of the runs on one dashboard page (`?ids=a,b`), polled by dashboard.js."""
    ids = [i for i in request.GET.get("ids", "").split(",") if i][:RUNS_PER_PAGE]
    runs = Run.objects.filter(pk__in=ids).prefetch_related("stages")
    return JsonResponse({"runs": [dashboard_row(run) for run in runs]})


def dashboard_row(run: Run) -> dict:
    stage = run.current_stage
    return {**run_state(run), "current_stage": stage.name if stage else None, "metrics": run.summary.get("metrics", {})}


def _hardware(request) -> str:
    value = request.GET.get("hardware") or request.POST.get("hardware") or hardware.default_hardware()
    return value if value in hardware.HARDWARE else hardware.default_hardware()


def new_run(request):
    if request.method == "POST":
        form = NewRunForm(request.POST, preset=request.POST.get("preset", "tiny"))
        if form.is_valid():
            try:
                # The form resolved the configuration; create_run stores it as it is.
                run = actions.create_run(form.resolved, name=form.cleaned_data["name"], owner=request.user)
            except config.ConfigError as e:  # e.g. more GPUs asked for than the node has
                for field, message in e.errors.items():
                    form.add_error(field if field in form.fields else None, message)
            else:
                actions.enqueue_run(run)
                messages.success(request, f"Run {run.id} is queued. Start a worker with `python manage.py qcluster` if none is running.")
                return redirect(run)
    else:
        preset = request.GET.get("preset", "tiny")
        if preset not in config.PRESETS:
            preset = "tiny"
        form = NewRunForm(preset=preset)
    device_kind = _hardware(request)
    initial_estimate = None
    if form.resolved or not form.is_bound:
        cfg = form.resolved or config.resolve(form["preset"].value())
        initial_estimate = estimate.estimate(cfg, device_kind)
    return render(request, "studio/new_run.html", {
        "form": form,
        "presets": config.PRESETS,
        "preset": form["preset"].value(),
        "hardware_choices": hardware.hardware_choices(),
        "hardware": device_kind,
        "estimate_url": reverse("studio:estimate"),
        "initial_estimate": initial_estimate,
    })


@require_GET
def estimate_json(request):
    """Parameters, FLOPs, time and cost of the form's configuration on the chosen hardware."""
    form = NewRunForm(request.GET, preset=request.GET.get("preset", "tiny"))
    if not form.is_valid():
        errors = {field: " ".join(str(m) for m in msgs) for field, msgs in form.errors.items()}
        return JsonResponse({"ok": False, "errors": errors})
    return JsonResponse({"ok": True, "estimate": estimate.estimate(form.resolved, _hardware(request))})


def run_detail(request, run_id):
    run = get_object_or_404(Run, pk=run_id)
    stages = list(run.stages.all())
    state = run_state(run)
    report_path = run.run_dir / "report.md"
    return render(request, "studio/run_detail.html", {
        "run": run,
        "stages": stages,
        # Rendered before the page's WebSocket connects (it then streams the running stage's log).
        "logs": [(stage, stage.log_tail(LOG_TAIL_LINES)) for stage in stages if stage.started_at],
        "config_items": sorted((k, v) for k, v in run.config.items() if k != "description"),
        "ws_url": f"/ws/runs/{run.id}/",
        "report_html": markdown_html(report_path.read_text(encoding="utf-8", errors="replace")) if report_path.is_file() else "",
        "report_url": reverse("studio:report_md", args=[run.id]),
        "compare_url": reverse("studio:compare") + f"?runs={run.id}",
        # Its checkpoints (any stage, any step) are chattable: the chat page opens with this run picked.
        "chat_url": reverse("studio:chat_new") + "?" + urlencode({"run": run.id}) if chat.list_checkpoints([run]) else "",
        "initial_run_json": state,
        "actions": state["actions"],
    })


@require_GET
def run_status_json(request, run_id):
    return JsonResponse(run_state(get_object_or_404(Run, pk=run_id)))


@require_GET
def report_md(request, run_id):
    run = get_object_or_404(Run, pk=run_id)
    path = run.run_dir / "report.md"  # the path comes from the database, never from the request
    if not path.is_file():
        raise Http404("This run has no report yet: it is written when its first stage finishes.")
    return FileResponse(open(path, "rb"), as_attachment=True, filename=f"report-{run.id}.md", content_type="text/markdown")


def compare(request):
    ids = list(dict.fromkeys(request.GET.getlist("runs")))[:COMPARE_MAX_RUNS]
    found = {run.id: run for run in Run.objects.filter(pk__in=ids)}
    runs = [found[i] for i in ids if i in found]
    missing = [i for i in ids if i not in found]
    if missing:
        messages.warning(request, f"No such run: {', '.join(missing)}")
    return render(request, "studio/compare.html", {
        "runs": runs,
        "ws_urls": [(run.id, f"/ws/runs/{run.id}/", run.name or run.id) for run in runs],
        "all_runs": Run.objects.all()[:100],
    })


# --- actions (POST): redirect for forms, JSON for fetch() with Accept: application/json ---


def _act(request, run_id, action, done_message):
    run = get_object_or_404(Run, pk=run_id)
    try:
        result = action(run)
    except actions.ActionError as e:
        message, ok = str(e), False
    else:
        run = result if isinstance(result, Run) else None
        message, ok = done_message(run) if run else done_message, True
    if "application/json" in request.headers.get("Accept", ""):
        return JsonResponse({"ok": ok, "message": message, "run": run_state(run) if run else None}, status=200 if ok else 409)
    (messages.success if ok else messages.error)(request, message)
    return redirect(run) if run else redirect("studio:dashboard")


@require_POST
def pause_run(request, run_id):
    return _act(request, run_id, actions.pause_run, lambda run: (
        f"Run {run.id} paused." if run.status == Run.Status.PAUSED else
        f"Pausing run {run.id}: the running stage finishes its step, saves a checkpoint and exits."))


@require_POST
def resume_run(request, run_id):
    # An optional GPU count moves the run (the run page's "on N GPUs" field); the config schema checks it.
    gpus = request.POST.get("gpus", "").strip() or None

    def resume(run):
        try:
            return actions.resume_run(run, gpus=gpus)
        except config.ConfigError as e:
            raise actions.ActionError(str(e)) from None

    return _act(request, run_id, resume, lambda run: f"Run {run.id} is queued again on {run.config['nproc_per_node']} GPU(s) "
                                                     "per node; it continues from its first unfinished stage.")


def _stop_message(run):
    if run.status == Run.Status.CANCELLED:
        return f"Run {run.id} cancelled."
    if not run.is_active:
        return f"Run {run.id} is already {run.status}."
    return f"Stopping run {run.id}: its processes were asked to exit."


@require_POST
def cancel_run(request, run_id):
    return _act(request, run_id, actions.cancel_run, _stop_message)


@require_POST
def kill_run(request, run_id):
    return _act(request, run_id, actions.kill_run, _stop_message)


@require_POST
def delete_run(request, run_id):
    return _act(request, run_id, actions.delete_run, f"Run {run_id} and its directory were deleted.")


def chat_page(request, conversation_id=None):
    """The chat page: a new chat, or one of the person's conversations (served over ws/chat/)."""
    conversation = None
    if conversation_id is not None:
        try:
            conversation = chat.get_conversation(request.user, conversation_id)
        except chat.ChatError:
            raise Http404("no such conversation") from None
    checkpoints = chat.list_checkpoints()
    settings = chat.conversation_settings(conversation) if conversation else chat.default_settings(checkpoints)
    if conversation is None and request.GET.get("run"):
        # "Chat with this run" (the run page): its most advanced stage, or the stage and step asked for.
        # A link with a bad step still opens the chat, on the latest step, and says so.
        try:
            step = chat.step_param(request.GET.get("step"))
        except chat.ChatError as e:
            messages.warning(request, str(e))
            step = None
        settings = chat.preselect(settings, checkpoints, request.GET.get("run"), request.GET.get("stage"), step)
    config = {
        "conversation": conversation.id if conversation else None,
        "ws_path": "/ws/chat/",
        "new_url": reverse("studio:chat_new"),
        "search_url": reverse("studio:chat_search"),
        "url_template": reverse("studio:chat", args=[0]),
        "checkpoints": checkpoints,
        "settings": settings,
        "limits": chat.limits(),
    }
    return render(request, "studio/chat.html", {
        "conversations": Conversation.objects.filter(owner=request.user).select_related("run"),
        "conversation": conversation,
        "chat_config": config,
    })


def _chat_act(request, action, ok_payload):
    wants_json = "application/json" in request.headers.get("Accept", "")
    try:
        result = action()
    except chat.ChatError as e:
        if wants_json:
            return JsonResponse({"ok": False, "error": str(e), "field": e.field}, status=404 if e.field == "conversation" else 400)
        messages.error(request, str(e))
        return redirect("studio:chat_new")
    payload = ok_payload(result)
    if wants_json:
        return JsonResponse(dict(payload, ok=True))
    return redirect(payload["url"])


@require_GET
def chat_search_json(request):
    """The sidebar's search: ids of the person's conversations with the words in a title or a message."""
    try:
        return JsonResponse({"ids": chat.search_conversations(request.user, request.GET.get("q"))})
    except chat.ChatError as e:
        return JsonResponse({"error": str(e), "field": e.field}, status=400)


@require_POST
def chat_rename(request, conversation_id):
    return _chat_act(request, lambda: chat.rename_conversation(request.user, conversation_id, request.POST.get("title")),
                     lambda conv: {"title": conv.title, "url": conv.get_absolute_url()})


@require_POST
def chat_delete(request, conversation_id):
    return _chat_act(request, lambda: chat.delete_conversation(request.user, conversation_id),
                     lambda _: {"url": reverse("studio:chat_new")})
