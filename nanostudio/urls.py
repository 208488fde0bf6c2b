from django.conf import settings
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

# The account pages of django.contrib.auth.urls, listed rather than included so
# that password reset (which mails a link) exists only where mail is set up:
# elsewhere its form would try an SMTP server on localhost:25, and it needs no login.
# Create the first user headlessly with
# DJANGO_SUPERUSER_USERNAME=... DJANGO_SUPERUSER_PASSWORD=... python manage.py createsuperuser --noinput
accounts = [
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("password_change/", auth_views.PasswordChangeView.as_view(), name="password_change"),
    path("password_change/done/", auth_views.PasswordChangeDoneView.as_view(), name="password_change_done"),
]
if settings.PASSWORD_RESET_ENABLED:
    accounts += [
        path("password_reset/", auth_views.PasswordResetView.as_view(), name="password_reset"),
        path("password_reset/done/", auth_views.PasswordResetDoneView.as_view(), name="password_reset_done"),
        path("reset/<uidb64>/<token>/", auth_views.PasswordResetConfirmView.as_view(), name="password_reset_confirm"),
        path("reset/done/", auth_views.PasswordResetCompleteView.as_view(), name="password_reset_complete"),
    ]

urlpatterns = [
    path("", include("studio.urls")),
    path("accounts/", include(accounts)),
    path("admin/", admin.site.urls),
]
