from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("", include("studio.urls")),
    # login/ logout/ password_change/ ...; create the first user headlessly with
    # DJANGO_SUPERUSER_USERNAME=... DJANGO_SUPERUSER_PASSWORD=... python manage.py createsuperuser --noinput
    path("accounts/", include("django.contrib.auth.urls")),
    path("admin/", admin.site.urls),
]
