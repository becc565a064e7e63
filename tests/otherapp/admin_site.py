"""An admin site over otherapp's desks and events, for tests/test_admin_dropin.py.

Used with ``@pytest.mark.urls("otherapp.admin_site")``: ``/dropin/`` lists events (UUID
primary keys, a timestamp many rows share) filtered by desk.
"""

from __future__ import annotations

from django.contrib import admin
from django.urls import path

from django_scale.admin import ScaleModelAdmin
from otherapp.models import Desk, Event

from testapp.admin import SmallThresholdPaginator

site = admin.AdminSite(name="dropin")


class EventAdmin(ScaleModelAdmin):
    list_display = ["title", "at"]
    list_filter = ["desk"]
    ordering = ["-at"]
    paginator = SmallThresholdPaginator
    list_per_page = 5


site.register(Desk)
site.register(Event, EventAdmin)

urlpatterns = [path("dropin/", site.urls)]
