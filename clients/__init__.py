"""Python client of the backbone: ``Client`` (sync) and ``AsyncClient`` over the stubs."""

from clients.channel import ClientOptions
from clients.client import AsyncClient, Client

__all__ = ["AsyncClient", "Client", "ClientOptions"]
