"""Chara Forge: SDXL game-character generation served over REST, WebSocket, a web UI and MCP."""

__version__ = "0.1.0"
