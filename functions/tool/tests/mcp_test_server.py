"""An MCP server for the aob-tool tests.

    python mcp_test_server.py stdio   # over stdin/stdout
    python mcp_test_server.py http    # streamable HTTP on 127.0.0.1, a free port; prints the
                                      # URL on its first line of standard output once it listens
"""

import os
import socket
import sys

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("aob-test")


@server.tool()
def echo(text: str) -> str:
    """Returns the text it was given."""
    return text


@server.tool()
def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


@server.tool()
def refuse(reason: str) -> str:
    """Always fails with the given reason."""
    raise ToolError(reason)


@server.tool()
def pid() -> int:
    """The server's process id."""
    return os.getpid()


@server.tool()
def die() -> str:
    """Ends the server's process in the middle of the call."""
    sys.stderr.write("aob-test: exiting in the middle of a call, as asked\n")
    sys.stderr.flush()
    os._exit(3)


def serve_http() -> None:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    app = server.streamable_http_app(host="127.0.0.1")
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    uv = uvicorn.Server(config)

    # Bound and listening: a client connecting now is queued until the app serves.
    print(f"http://127.0.0.1:{port}/mcp", flush=True)
    uv.run(sockets=[sock])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "http":
        serve_http()
    else:
        server.run("stdio")
