"""URLconf for the Django middleware test."""

from django.http import HttpRequest, JsonResponse
from django.urls import path


def work(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"worker": request.workermon_worker})  # type: ignore[attr-defined]


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


urlpatterns = [path("work", work), path("healthz", healthz)]
