"""The PostgreSQL backend, recording each connection it opens and naming its sessions."""

from __future__ import annotations

from typing import Any

from django.db.backends.postgresql import base


class DatabaseWrapper(base.DatabaseWrapper):
    """Django's PostgreSQL wrapper whose connections the tests can recognise."""

    #: The parameters of every connection this backend opened, in order.
    opened: list[dict[str, Any]] = []

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        connection = super().get_new_connection(conn_params)
        import traceback

        traceback.print_stack()
        DatabaseWrapper.opened.append(dict(conn_params))
        return connection

    def init_connection_state(self) -> None:
        super().init_connection_state()
        with self.connection.cursor() as cursor:
            cursor.execute("SET application_name = 'django-scale-custom-backend'")
