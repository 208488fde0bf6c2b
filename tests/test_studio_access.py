"""Who may do what: every page and action needs a login; actions are POST-only with CSRF; JSON endpoints."""

from __future__ import annotations

import pytest
from django.urls import reverse

from studio import actions, ingest
from studio.models import Run

pytestmark = pytest.mark.django_db

TWO = {"stages": "tok_train,base_train"}


@pytest.fixture
def run(runs_dir):
    return actions.create_run("tiny", TWO)


def all_urls(run_id):
    pages = [reverse("studio:dashboard"), reverse("studio:new_run"), reverse("studio:compare"), reverse("studio:runs_json"),
             reverse("studio:estimate"), reverse("studio:run_detail", args=[run_id]),
             reverse("studio:run_status", args=[run_id]), reverse("studio:report_md", args=[run_id])]
    posts = [reverse(f"studio:{name}_run", args=[run_id]) for name in ("pause", "resume", "cancel", "kill", "delete")]
    return pages, posts


def test_anonymous_visitors_are_sent_to_the_login_page_and_change_nothing(anon_client, run):
    pages, posts = all_urls(run.id)
    for url in pages + posts:
        response = anon_client.post(url) if url in posts else anon_client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/"), url
    run.refresh_from_db()
    assert run.status == Run.Status.QUEUED and Run.objects.count() == 1
    assert anon_client.get("/accounts/login/").status_code == 200


def test_logging_in_through_the_form_opens_the_dashboard(anon_client, user, run):
    response = anon_client.post("/accounts/login/", {"username": "ada", "password": "a long password for tests"}, follow=True)
    assert response.redirect_chain[-1][0] == reverse("studio:dashboard")
    assert run.id in response.content.decode()
    bad = anon_client.post("/accounts/login/", {"username": "ada", "password": "wrong"})
    assert "did not match" in bad.content.decode()


def test_actions_refuse_get(client, run):
    for name in ("pause", "resume", "cancel", "kill", "delete"):
        assert client.get(reverse(f"studio:{name}_run", args=[run.id])).status_code == 405


def test_runs_launched_from_the_web_record_their_owner(client, user, runs_dir):
    from tests.test_studio_views import form_data

    response = client.post(reverse("studio:new_run"), form_data(name="mine"))
    assert response.status_code == 302
    assert Run.objects.get(name="mine").owner == user


def test_status_json_describes_the_run_and_its_possible_actions(client, run):
    state = client.get(reverse("studio:run_status", args=[run.id])).json()
    assert state["id"] == run.id and state["status"] == "queued"
    assert [s["name"] for s in state["stages"]] == ["tok_train", "base_train"]
    assert state["actions"]["cancel"] == reverse("studio:cancel_run", args=[run.id])
    assert state["actions"]["pause"] is None and state["actions"]["delete"] is None


def test_json_actions_answer_with_the_new_state_or_a_409(client, run):
    url = reverse("studio:pause_run", args=[run.id])
    refused = client.post(url, HTTP_ACCEPT="application/json")
    assert refused.status_code == 409 and "only a running run can be paused" in refused.json()["message"]
    cancelled = client.post(reverse("studio:cancel_run", args=[run.id]), HTTP_ACCEPT="application/json")
    assert cancelled.status_code == 200 and cancelled.json()["run"]["status"] == "cancelled"
    assert cancelled.json()["run"]["actions"]["resume"]


def test_resume_and_delete_from_the_page(client, run):
    actions.cancel_run(run)
    response = client.post(reverse("studio:resume_run", args=[run.id]), follow=True)
    assert "queued again" in response.content.decode()
    run.refresh_from_db()
    assert run.status == Run.Status.QUEUED
    refused = client.post(reverse("studio:delete_run", args=[run.id]), follow=True)
    assert "stop it before deleting it" in refused.content.decode() and Run.objects.filter(pk=run.pk).exists()
    actions.cancel_run(run)
    response = client.post(reverse("studio:delete_run", args=[run.id]), follow=True)
    assert response.redirect_chain[-1][0] == reverse("studio:dashboard")
    assert not Run.objects.filter(pk=run.pk).exists() and not run.run_dir.exists()


def test_report_download_is_404_until_written_then_markdown(client, run):
    url = reverse("studio:report_md", args=[run.id])
    assert client.get(url).status_code == 404
    (run.run_dir / "report.md").write_text("# Report\n")
    response = client.get(url)
    assert response.status_code == 200 and response["Content-Type"] == "text/markdown"
    assert "attachment" in response["Content-Disposition"] and b"".join(response.streaming_content) == b"# Report\n"


def test_dashboard_shows_progress_and_key_metrics_from_the_summary(client, run):
    summary = ingest.summarize({}, [
        {"stage": "base_train", "kind": "setup", "num_iterations": 200},
        {"stage": "base_train", "kind": "metric", "step": 50, "loss": 3.25, "tok_per_sec": 5207.0},
        {"stage": "base_train", "kind": "eval", "name": "val_bpb", "step": 50, "val_bpb": 1.7521},
    ])
    Run.objects.filter(pk=run.pk).update(summary=summary, status=Run.Status.RUNNING)
    html = client.get(reverse("studio:dashboard")).content.decode()
    assert "step 50/200" in html and "25%" in html and "3.250" in html and "1.7521" in html and "5207" in html
    rows = client.get(reverse("studio:runs_json"), {"ids": run.id}).json()["runs"]
    assert rows[0]["metrics"]["loss"]["last"] == 3.25 and rows[0]["progress"]["step"] == 50


def test_compare_page_lists_the_chosen_runs_and_warns_about_unknown_ones(client, run):
    response = client.get(reverse("studio:compare"), {"runs": [run.id, "nope"]})
    assert response.status_code == 200
    assert [r.id for r in response.context["runs"]] == [run.id]
    assert "No such run: nope" in response.content.decode()
