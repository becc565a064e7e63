"""Views the routing tests drive through Django's test clients."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from django_scale.replicas import current_state, use_replica

from testapp.models import Author


def _routing() -> dict[str, object]:
    state = current_state()
    assert state is not None, "ScaleMiddleware did not open a routing state"
    return {"reads": dict(state.reads), "pinned": state.pinned, "wrote": state.wrote}


@csrf_exempt
def create_author(request: HttpRequest) -> JsonResponse:
    """Create an author, then read it back in the same request."""
    author = Author.objects.create(name=request.POST.get("name", "someone"))
    seen = Author.objects.filter(pk=author.pk).exists()
    return JsonResponse({"pk": author.pk, "seen": seen, **_routing()})


def show_author(request: HttpRequest, pk: int) -> JsonResponse:
    found = Author.objects.filter(pk=pk).exists()
    return JsonResponse({"found": found, **_routing()})


@csrf_exempt
def rename_author(request: HttpRequest, pk: int) -> JsonResponse:
    """Read an author, then write back what was read plus "!" (a read-modify-write).

    With ``?replica=1`` the read runs inside ``use_replica()``.
    """
    if request.GET.get("replica"):
        with use_replica():
            author = Author.objects.get(pk=pk)
    else:
        author = Author.objects.get(pk=pk)
    author.name = f"{author.name}!"
    author.save(update_fields=["name"])
    return JsonResponse({"name": author.name, **_routing()})


def sleepy_authors(request: HttpRequest) -> JsonResponse:
    """Read the authors' names with a query that sleeps ``?sleep=`` seconds first."""
    seconds = float(request.GET.get("sleep", "0"))
    sql = "SELECT id, name FROM testapp_author WHERE pg_sleep(%s) IS NOT NULL ORDER BY id"
    names = [author.name for author in Author.objects.raw(sql, [seconds])]
    return JsonResponse({"names": names, **_routing()})


# No csrf_exempt: on Django 4.2 it cannot wrap an async view, and the test client does not
# enforce CSRF checks anyway.
async def async_create_author(request: HttpRequest) -> JsonResponse:
    author = await Author.objects.acreate(name=request.POST.get("name", "someone"))
    seen = await Author.objects.filter(pk=author.pk).aexists()
    return JsonResponse({"pk": author.pk, "seen": seen, **_routing()})


async def async_rename_author(request: HttpRequest, pk: int) -> JsonResponse:
    author = await Author.objects.aget(pk=pk)
    author.name = f"{author.name}!"
    await author.asave(update_fields=["name"])
    return JsonResponse({"name": author.name, **_routing()})


async def async_show_author(request: HttpRequest, pk: int) -> JsonResponse:
    found = await Author.objects.filter(pk=pk).aexists()
    return JsonResponse({"found": found, **_routing()})


@csrf_exempt
def create_author_and_enqueue(request: HttpRequest) -> JsonResponse:
    """Create an author and hand its id to a Celery task, which reports what it saw."""
    from testapp.tasks import author_exists

    author = Author.objects.create(name=request.POST.get("name", "someone"))
    result = author_exists.delay(author.pk)
    return JsonResponse({"pk": author.pk, "task": result.id})


async def async_statement_timeout(request: HttpRequest) -> JsonResponse:
    """Show the session's statement_timeout inside a limit from the query string, and after it."""
    from asgiref.sync import sync_to_async
    from django.db import connections

    from django_scale.timeouts import statement_timeout

    def show() -> str:
        with connections["default"].cursor() as cursor:
            cursor.execute("SHOW statement_timeout")
            return str(cursor.fetchone()[0])

    async with statement_timeout(int(request.GET["ms"]) / 1000, using="default"):
        inside = await sync_to_async(show)()
    after = await sync_to_async(show)()
    return JsonResponse({"inside": inside, "after": after})


def fragment(request: HttpRequest) -> HttpResponse:
    """Render a template with a {% swrcache %} fragment that varies on ?section=."""
    from django.template import engines

    from testapp.cached import probe

    template = engines["django"].from_string(
        "{% load scale %}<p>{% swrcache 60 3600 'sidebar' section %}{{ probe_value }}{% endswrcache %}</p>"
    )

    class Lazy:
        def __str__(self) -> str:
            return probe.record("fragment", request.GET.get("section"))

    context = {"section": request.GET.get("section", ""), "probe_value": Lazy()}
    return HttpResponse(template.render(context, request))
