from django.urls import path

from studio import views

app_name = "studio"
urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("runs.json", views.runs_json, name="runs_json"),
    path("runs/new/", views.new_run, name="new_run"),
    path("runs/estimate/", views.estimate_json, name="estimate"),
    path("compare/", views.compare, name="compare"),
    path("runs/<str:run_id>/", views.run_detail, name="run_detail"),
    path("runs/<str:run_id>/status.json", views.run_status_json, name="run_status"),
    path("runs/<str:run_id>/report.md", views.report_md, name="report_md"),
    path("runs/<str:run_id>/pause/", views.pause_run, name="pause_run"),
    path("runs/<str:run_id>/resume/", views.resume_run, name="resume_run"),
    path("runs/<str:run_id>/cancel/", views.cancel_run, name="cancel_run"),
    path("runs/<str:run_id>/kill/", views.kill_run, name="kill_run"),
    path("runs/<str:run_id>/delete/", views.delete_run, name="delete_run"),
    path("chat/", views.chat_page, name="chat_new"),
    path("chat/search.json", views.chat_search_json, name="chat_search"),
    path("chat/<int:conversation_id>/", views.chat_page, name="chat"),
    path("chat/<int:conversation_id>/rename/", views.chat_rename, name="chat_rename"),
    path("chat/<int:conversation_id>/delete/", views.chat_delete, name="chat_delete"),
]
