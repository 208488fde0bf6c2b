from django.urls import path

from studio import views

app_name = "studio"
urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("runs/new/", views.new_run, name="new_run"),
    path("runs/<str:run_id>/", views.run_detail, name="run_detail"),
    path("runs/<str:run_id>/cancel/", views.cancel_run, name="cancel_run"),
]
