"""Pages: dashboard, new-run form, run detail, cancel."""

from __future__ import annotations

import pytest
from django.urls import reverse
from django_q.models import OrmQ

from studio import actions
from studio.forms import preset_values
from studio.models import Run
from pipeline import config

pytestmark = pytest.mark.django_db


def form_data(preset="tiny", **changes):
    """What a browser submits for the form as shown for `preset`, with `changes` typed in."""
    data = {"preset": preset, "name": ""}
    for key, value in preset_values(preset).items():
        data[key] = value if isinstance(value, list) else str(value)
    data.update(changes)
    return data


def test_dashboard_without_runs_invites_to_start_one(client, runs_dir):
    page = client.get("/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "No runs yet" in html and "runjob tiny" in html
    assert "/static/css/studio.css" in html
    for preset in config.PRESETS:
        assert f"?preset={preset}" in html


def test_dashboard_lists_runs_with_status_and_stages(client, runs_dir, fake_stages):
    done = actions.execute_run(actions.create_run("tiny", name="finished one"))
    queued = actions.create_run("tiny", {"stages": "tok_train"})
    html = client.get("/").content.decode()
    assert done.id in html and queued.id in html and "finished one" in html
    assert 'class="badge status-done"' in html and 'class="badge status-queued"' in html
    assert 'class="chip status-done" title="tok_eval: done"' in html
    assert html.index(queued.id) < html.index(done.id)  # newest first


def test_new_run_form_is_built_from_the_schema(client):
    html = client.get(reverse("studio:new_run")).content.decode()
    for f in config.FIELDS:
        assert f'name="{f.name}"' in html
        assert f.help.replace("'", "&#x27;") in html
    assert '<input type="number" name="depth" value="4" min="1" max="64" step="1"' in html
    assert '<input type="text" name="rdzv_endpoint" maxlength="300"' in html  # the schema's limit, for the browser
    assert 'name="csrfmiddlewaretoken"' in html
    assert 'name="stages" value="tok_train" id="id_stages_0" checked>' in html
    assert 'name="stages" value="base_train" id="id_stages_2" checked>' in html
    assert 'name="stages" value="mid_train" id="id_stages_4" disabled>' in html and "mid_train (coming)" in html


def test_new_run_form_starts_from_the_chosen_preset(client):
    form = client.get(reverse("studio:new_run"), {"preset": "speedrun"}).context["form"]
    assert form["depth"].value() == 20 and form["preset"].value() == "speedrun"


def test_valid_submission_creates_and_queues_a_run(client, runs_dir):
    response = client.post(reverse("studio:new_run"), form_data(name="from the web", vocab_size="2048"))
    run = Run.objects.get()
    assert response.status_code == 302 and response["Location"] == run.get_absolute_url()
    assert run.name == "from the web" and run.config["vocab_size"] == 2048 and run.status == "queued"
    assert (run.run_dir / "config.json").exists()
    (task,) = OrmQ.objects.all()
    assert task.task["args"] == (run.id,)
    page = client.get(response["Location"])
    assert f"Run {run.id} is queued" in page.content.decode()


@pytest.mark.parametrize(
    "changes, field, message",
    [
        ({"depth": "0"}, "depth", "must be at least 1, got 0"),
        ({"depth": "abc"}, "depth", "expected a whole number, got &#x27;abc&#x27;"),
        ({"total_batch_size": "3000"}, "total_batch_size", "is not a multiple of max_seq_len x device_batch_size x GPUs = 2048"),
        ({"stages": ["tok_train", "bogus"]}, "stages", "unknown stage(s) bogus"),
        ({"stages": []}, "stages", "choose at least one stage"),
        ({"data_source": "somewhere"}, "data_source", "must be one of fineweb-edu, climbmix"),
    ],
)
def test_invalid_submission_shows_the_field_error_and_creates_nothing(client, runs_dir, changes, field, message):
    response = client.post(reverse("studio:new_run"), form_data(**changes))
    assert response.status_code == 200
    assert field in response.context["form"].errors
    html = response.content.decode()
    assert message in html
    assert "Please fix the highlighted settings" in html
    assert Run.objects.count() == 0 and OrmQ.objects.count() == 0
    assert list(runs_dir.iterdir()) == []


def test_invalid_submission_keeps_what_was_typed(client, runs_dir):
    response = client.post(reverse("studio:new_run"), form_data(depth="0", vocab_size="8192"))
    form = response.context["form"]
    assert form["vocab_size"].value() == "8192" and form["depth"].value() == "0"


def test_unknown_preset_in_a_submission_is_reported(client, runs_dir):
    response = client.post(reverse("studio:new_run"), form_data(preset="huge"))
    assert response.status_code == 200
    assert "unknown preset" in response.content.decode()
    assert Run.objects.count() == 0


def test_submission_without_csrf_token_is_refused(runs_dir, user):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    response = client.post(reverse("studio:new_run"), form_data())
    assert response.status_code == 403 and Run.objects.count() == 0


def test_run_detail_shows_stages_metrics_config_and_logs(client, runs_dir, fake_stages):
    fake_stages["tok_eval"] = "fail"
    run = actions.execute_run(actions.create_run("tiny", name="detail"))
    page = client.get(run.get_absolute_url())
    assert page.status_code == 200
    html = page.content.decode()
    assert "detail" in html and 'class="badge status-failed"' in html
    assert "What went wrong" in html and "stage tok_eval failed (exit code 3)" in html
    assert f'data-ws-url="/ws/runs/{run.id}/"' in html and 'id="run-initial"' in html  # the live part takes over from here
    assert "<code>vocab_size</code>" in html and "4096" in html
    assert "log line 29" in html and "logs/tok_train.log" in html
    assert "fake_stage.py" in html  # the command, to run it by hand
    assert 'http-equiv="refresh"' not in html
    assert reverse("studio:cancel_run", args=[run.id]) not in html and reverse("studio:resume_run", args=[run.id]) in html


def test_unknown_run_is_404(client):
    assert client.get(reverse("studio:run_detail", args=["nope"])).status_code == 404


def test_cancel_button_cancels_a_queued_run(client, runs_dir):
    run = actions.create_run("tiny")
    page = client.get(run.get_absolute_url()).content.decode()
    assert "Cancel run" in page and 'http-equiv="refresh"' in page
    response = client.post(reverse("studio:cancel_run", args=[run.id]), follow=True)
    run.refresh_from_db()
    assert run.status == "cancelled"
    assert f"Run {run.id} cancelled" in response.content.decode()


def test_cancel_needs_post(client, runs_dir):
    run = actions.create_run("tiny")
    assert client.get(reverse("studio:cancel_run", args=[run.id])).status_code == 405
    run.refresh_from_db()
    assert run.status == "queued"


def test_admin_lists_runs(admin_client, runs_dir):
    run = actions.create_run("tiny")
    page = admin_client.get(reverse("admin:studio_run_changelist"))
    assert page.status_code == 200 and run.id in page.content.decode()
    assert admin_client.get(reverse("admin:studio_run_change", args=[run.id])).status_code == 200
