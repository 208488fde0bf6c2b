from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("", include("studio.urls")),
    path("admin/", admin.site.urls),
]
