"""Actors: one coroutine each, exchanging msgspec messages over anyio memory channels."""
